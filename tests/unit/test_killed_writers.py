"""Writers killed midway (SIGKILL, no cleanup): a checkpoint upload and an export.

The newest *complete* checkpoint is a run's latest: resume (the driver's plan check), export and a
finetune's projector start all skip a newer checkpoint whose upload was cut short, with a warning,
and refuse it when it is named. A checkpoint is complete when its marker is there (written last by
rank 0, after every rank's report returned) or Ray registered it; outside a Ray run (no snapshot),
when every file of its layout is there. The run directories here are laid out by hand as a Ray run
leaves them; that a real run writes the marker is asserted by tests/integration/test_training.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vistralv_ray.config import Config, dump_config
from vistralv_ray.data import runs
from vistralv_ray.data.runs import COMPLETE_FILE, RAY_SNAPSHOT_FILE, IncompleteCheckpointError, latest_checkpoint_uri
from vistralv_ray.inference.export import open_checkpoint
from vistralv_ray.model.assembly import resolve_projector_uri
from vistralv_ray.training.driver import check_resume_plan

PLAN = {"total_steps": 8, "world_size": 2, "global_batch": 8, "base_lr": 0.001, "effective_lr": 0.001}

# Copies a checkpoint's files into place one by one, as an upload does, the marker last; killed
# (SIGKILL, no cleanup) after KILL_AFTER files, after all but the marker ("all"), or halfway through
# the marker ("marker").
UPLOAD = """
import os, signal, sys
from pathlib import Path
from vistralv_ray.data.runs import COMPLETE_FILE, complete_marker

source, target, kill_after, step = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
names = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
for i, name in enumerate(names):
    if str(i) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    (target / name).parent.mkdir(parents=True, exist_ok=True)
    (target / name).write_bytes((source / name).read_bytes())
if kill_after == "all":
    os.kill(os.getpid(), signal.SIGKILL)
marker = complete_marker(step)
if kill_after == "marker":
    (target / COMPLETE_FILE).write_bytes(marker[: len(marker) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
(target / COMPLETE_FILE).write_bytes(marker)
"""


def checkpoint_files(directory: Path, step: int, plan: dict) -> Path:
    """Every file a 2-rank ZeRO-2 checkpoint holds (DeepSpeed's shards faked), without the marker."""
    tag = f"step-{step}"
    (directory / "deepspeed" / tag).mkdir(parents=True)
    (directory / "deepspeed" / tag / "mp_rank_00_model_states.pt").write_bytes(b"model")
    for rank in range(plan["world_size"]):
        (directory / "deepspeed" / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"optim")
        (directory / "seen").mkdir(exist_ok=True)
        (directory / "seen" / f"rank-{rank}.npy").write_bytes(b"seen")
    (directory / runs.STATE_FILE).write_text(json.dumps({"step": step, "tag": tag, "plan": plan}))
    (directory / runs.PROJECTOR_FILE).write_bytes(f"projector of step {step}".encode())
    (directory / "tokenizer").mkdir()
    (directory / "tokenizer" / "tokenizer_config.json").write_text("{}")
    dump_config(Config(), directory / runs.CONFIG_FILE)
    return directory


def upload(tmp_path: Path, run: Path, step: int, plan: dict, kill_after: str) -> int:
    staged = checkpoint_files(tmp_path / f"staged-{step}", step, plan)
    target = run / f"checkpoint-{step:06d}"
    target.mkdir(parents=True)
    script = tmp_path / "upload.py"
    script.write_text(textwrap.dedent(UPLOAD))
    proc = subprocess.run([sys.executable, str(script), str(staged), str(target), kill_after, str(step)])
    return proc.returncode


def ray_snapshot(run: Path, registered: list[str]) -> None:
    """What Ray Train's controller keeps in the run directory (the part we read)."""
    results = [{"checkpoint_dir_name": name, "metrics": {}} for name in registered]
    (run / RAY_SNAPSHOT_FILE).write_text(json.dumps({"ray_version": "2.60.0", "checkpoint_results": results}))


@pytest.fixture()
def warnings(caplog):
    logger = logging.getLogger("vistralv_ray")  # does not propagate to the root logger
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("kill_after", ["3", "all", "marker"])
def test_a_checkpoint_upload_killed_midway_is_skipped_by_resume_export_and_projector_init(
    tmp_path, kill_after, warnings
):
    run = tmp_path / "runs" / "align-seed0"
    assert upload(tmp_path, run, 2, PLAN, kill_after="none") == 0  # complete, and registered by Ray
    ray_snapshot(run, ["checkpoint-000002"])
    # The newer upload, killed midway, planned otherwise (resuming from it would be refused).
    assert upload(tmp_path, run, 4, {**PLAN, "total_steps": 99}, kill_after) == -9
    partial, complete = run / "checkpoint-000004", run / "checkpoint-000002"
    assert (partial / COMPLETE_FILE).exists() == (kill_after == "marker")

    assert latest_checkpoint_uri(str(run)) == str(complete)
    assert f"skipping {partial}: an incomplete checkpoint" in warnings.text
    # resume: the driver checks the plan of the newest complete checkpoint (step 4's would be refused)
    check_resume_plan(Config(), str(run), PLAN)
    with open_checkpoint(str(run)) as ckpt:  # export
        assert (ckpt.step, ckpt.uri) == (2, str(complete))
    assert resolve_projector_uri("align-seed0", str(tmp_path / "runs")) == str(complete / runs.PROJECTOR_FILE)
    for named in (lambda: latest_checkpoint_uri(str(partial)), lambda: resolve_projector_uri(str(partial))):
        with pytest.raises(IncompleteCheckpointError, match="checkpoint-000004: an incomplete checkpoint"):
            named()
    with pytest.raises(IncompleteCheckpointError), open_checkpoint(str(partial)):
        pass
    # Once Ray registers it (its marker write was what got cut short), it is the latest.
    ray_snapshot(run, ["checkpoint-000002", "checkpoint-000004"])
    if kill_after != "3":
        assert latest_checkpoint_uri(str(run)) == str(partial)


def test_without_a_ray_snapshot_a_checkpoint_is_complete_when_its_whole_layout_is_there(tmp_path, warnings):
    """A checkpoint copied out of its run, or a run written before the marker: every file of the
    layout (each rank's DeepSpeed shard and seen keys included) must be there."""
    run = tmp_path / "run"
    checkpoint_files(run / "checkpoint-000002", 2, PLAN)
    checkpoint_files(run / "checkpoint-000004", 4, PLAN)
    assert latest_checkpoint_uri(str(run)) == str(run / "checkpoint-000004")
    (run / "checkpoint-000004" / "deepspeed" / "step-4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert latest_checkpoint_uri(str(run)) == str(run / "checkpoint-000002")
    assert "deepspeed/step-4/zero_pp_rank_1_*optim_states.pt missing" in warnings.text
    with pytest.raises(IncompleteCheckpointError, match="zero_pp_rank_1"):
        latest_checkpoint_uri(str(run / "checkpoint-000004"))
    (run / "checkpoint-000002" / "seen" / "rank-1.npy").unlink()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        latest_checkpoint_uri(str(run))
    runs.mark_complete(str(run / "checkpoint-000002"), 2)  # the marker is what counts when there is one
    assert latest_checkpoint_uri(str(run)) == str(run / "checkpoint-000002")


# An export whose model files are written one by one, killed (SIGKILL) after two of them.
KILLED_EXPORT = """
import os, signal, sys
from pathlib import Path
from types import SimpleNamespace
import vistralv_ray.inference.export as export_module

lora = SimpleNamespace(enabled=False)
config = SimpleNamespace(train=SimpleNamespace(stage="align"), model=SimpleNamespace(lora=lora))
config.model.template, config.model.aspect = "vistral", "pad"
ckpt = SimpleNamespace(uri="run/checkpoint-000004", step=4, config=config, precision="fp32")

class Checkpoint:
    def __enter__(self):
        return ckpt
    def __exit__(self, *exc):
        return False

def save(model, tokenizer, template, cfg, out, max_shard_size):
    for i, name in enumerate(["config.json", "model-00001.safetensors", "model-00002.safetensors"]):
        if i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        (Path(out) / name).write_text("new")

export_module.open_checkpoint = lambda source: Checkpoint()
model = SimpleNamespace(to=lambda dtype: None)
assembled = SimpleNamespace(tokenizer=None, chat_template="", image_seq_length=4)
export_module.trained_model = lambda c: (model, assembled)
export_module.save_export = save
export_module.export("run", sys.argv[1], overwrite=sys.argv[2] == "overwrite")
"""


@pytest.mark.parametrize("existing", [False, True])
def test_an_export_killed_midway_leaves_the_old_export_or_none(tmp_path, existing):
    out = tmp_path / "export"
    if existing:
        out.mkdir()
        (out / "config.json").write_text("old")
    script = tmp_path / "killed_export.py"
    script.write_text(textwrap.dedent(KILLED_EXPORT))
    proc = subprocess.run([sys.executable, str(script), str(out), "overwrite"], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == (["export", "killed_export.py"] if existing else ["killed_export.py"])
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["config.json"] and (out / "config.json").read_text() == "old"
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".export.partial-")]
    assert len(partial) == 1 and not (partial[0] / "vistralv_export.json").exists()  # hidden, and never complete


def test_a_zero3_checkpoint_needs_every_ranks_model_states(tmp_path, warnings):
    """ZeRO-3 writes one model-states file per rank: a layout with only some of them is partial."""
    run = tmp_path / "run"
    checkpoint_files(run / "checkpoint-000002", 2, PLAN)
    checkpoint = checkpoint_files(run / "checkpoint-000004", 4, PLAN)
    shards = checkpoint / "deepspeed" / "step-4"
    (shards / "mp_rank_00_model_states.pt").unlink()
    for rank in range(PLAN["world_size"]):
        (shards / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"model")
    assert latest_checkpoint_uri(str(run)) == str(checkpoint)
    (shards / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()  # the upload of rank 1 cut short
    assert latest_checkpoint_uri(str(run)) == str(run / "checkpoint-000002")
    assert "zero_pp_rank_1_*model_states.pt" in warnings.text
