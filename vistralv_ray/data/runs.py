"""The layout of a run directory in storage: checkpoint directories and the files that name them.

A run is `<storage>/<name>/` holding `checkpoint-NNNNNN/` directories (see `training.checkpointing`
for what one holds). This sits beside `storage` so that every layer (the model's projector loader,
export, the driver) finds checkpoints without importing the training layer.

A checkpoint is complete when its `checkpoint_complete.json` is there: rank 0 writes it into
storage last, once every rank's `ray.train.report(checkpoint=...)` has returned (each rank uploads
its own part before its report returns), or when Ray Train registered it (see `checkpoint_problem`).
Anything else is a checkpoint whose upload was cut short (a killed worker, a lost node). The newest
*complete* checkpoint is the run's latest; a newer partial one is skipped with a warning, and one
named explicitly is an error.
"""

from __future__ import annotations

import json
import re

from vistralv_ray.data import storage
from vistralv_ray.logging import get_logger

log = get_logger(__name__)

STATE_FILE = "trainer_state.json"
DEEPSPEED_DIR = "deepspeed"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run.json"
PROJECTOR_FILE = "projector.safetensors"
COMPLETE_FILE = "checkpoint_complete.json"
# Ray Train's record of the checkpoints it registered (ray.train.v2 CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
_CHECKPOINT_DIR = re.compile(r"checkpoint[-_](\d+)$")


class IncompleteCheckpointError(FileNotFoundError):
    """A checkpoint directory named explicitly whose upload did not finish."""


def complete_marker(step: int) -> bytes:
    return json.dumps({"step": step, "complete": True}).encode()


def mark_complete(uri: str, step: int) -> None:
    """Write the marker that makes a checkpoint directory complete (last, after everything else)."""
    storage.write_bytes(storage.join(uri, COMPLETE_FILE), complete_marker(step))


def _files_under(uri: str) -> set[str]:
    _, base = storage.filesystem_for(uri)
    prefix = ("s3://" if storage.is_s3(uri) else "") + base.rstrip("/") + "/"
    return {p[len(prefix) :] for p in storage.list_tree(uri) if p.startswith(prefix)}


def _read_json(uri: str) -> dict | None:
    try:
        value = json.loads(storage.read_bytes(uri))
    except (ValueError, FileNotFoundError):
        return None
    return value if isinstance(value, dict) else None


def ray_registered(run_uri: str) -> set[str] | None:
    """The checkpoint directories Ray Train registered for a run (its controller does so once every
    rank has reported, i.e. uploaded, its part), from the snapshot Ray keeps in the run directory;
    None when the run has no readable snapshot."""
    snapshot = _read_json(storage.join(run_uri, RAY_SNAPSHOT_FILE))
    if snapshot is None or not isinstance(snapshot.get("checkpoint_results"), list):
        return None
    return {r.get("checkpoint_dir_name") for r in snapshot["checkpoint_results"] if isinstance(r, dict)}


def checkpoint_problem(uri: str, registered: set[str] | None = None) -> str | None:
    """None for a complete checkpoint directory; otherwise what makes it incomplete.

    Complete: its marker is there, or Ray registered it (`registered`, from the run's snapshot: the
    marker's write was cut short after Ray's upload). In a run Ray keeps a snapshot of, anything else
    is an upload cut short. A checkpoint outside such a run (copied on its own, or older) is complete
    when every file of its layout is there; a truncated file then goes unnoticed."""
    files = _files_under(uri)
    if COMPLETE_FILE in files:
        marker = _read_json(storage.join(uri, COMPLETE_FILE))
        if marker and marker.get("complete") is True:
            return None
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if registered is not None:
        return None if name in registered else f"no {COMPLETE_FILE}, and Ray never registered it"
    if STATE_FILE not in files:
        return f"no {COMPLETE_FILE} and no {STATE_FILE}"
    state = _read_json(storage.join(uri, STATE_FILE))
    if not state or not isinstance(state.get("tag"), str):
        return f"no {COMPLETE_FILE} and its {STATE_FILE} is cut short"
    plan = state.get("plan") if isinstance(state.get("plan"), dict) else {}
    world = plan.get("world_size", 1)
    ds = f"{DEEPSPEED_DIR}/{state['tag']}/"
    missing = [f for f in (CONFIG_FILE, PROJECTOR_FILE, "tokenizer/tokenizer_config.json") if f not in files]
    if not any(f.startswith(ds) and f.endswith("model_states.pt") for f in files):
        missing.append(ds + "*model_states.pt")
    # ZeRO-3 writes one model-states file per rank (ZeRO-1/2 one in all): then every rank's must be there.
    per_rank_models = any(f.startswith(ds) and f.endswith("_model_states.pt") and "zero_pp_rank_" in f for f in files)
    for rank in range(world if isinstance(world, int) and world > 0 else 1):
        if per_rank_models and not any(
            f.startswith(ds) and re.search(rf"(^|_)zero_pp_rank_{rank}_mp_rank_\d+_model_states\.pt$", f[len(ds) :])
            for f in files
        ):
            missing.append(f"{ds}zero_pp_rank_{rank}_*model_states.pt")
        if f"seen/rank-{rank}.npy" not in files:
            missing.append(f"seen/rank-{rank}.npy")
        shard = re.compile(rf"(^|_)zero_pp_rank_{rank}_mp_rank_\d+_optim_states\.pt$")
        if not any(f.startswith(ds) and shard.search(f[len(ds) :]) for f in files):
            missing.append(f"{ds}zero_pp_rank_{rank}_*optim_states.pt")
    if missing:
        return f"no {COMPLETE_FILE}, and {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} missing"
    return None


def latest_checkpoint_uri(source: str) -> str:
    """A checkpoint directory as given (an error when incomplete), or the newest complete
    `checkpoint-NNNNNN` of a run directory (newer incomplete ones skipped with a warning)."""
    import pyarrow.fs as pafs

    source = source.rstrip("/")
    named = _CHECKPOINT_DIR.fullmatch(source.rsplit("/", 1)[-1])
    if named or storage.exists(storage.join(source, STATE_FILE)) or storage.exists(storage.join(source, COMPLETE_FILE)):
        if not storage.exists(source):
            raise FileNotFoundError(f"{source}: not a run or checkpoint directory")
        parent = source.rsplit("/", 1)[0] if "/" in source else "."
        problem = checkpoint_problem(source, ray_registered(parent))
        if problem:
            raise IncompleteCheckpointError(
                f"{source}: an incomplete checkpoint ({problem}): its upload was cut short; "
                "name an earlier checkpoint or the run directory (its newest complete checkpoint)"
            )
        return source

    fs, path = storage.filesystem_for(source)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{source}: not a run or checkpoint directory")
    steps = []
    for entry in fs.get_file_info(pafs.FileSelector(path)):
        match = _CHECKPOINT_DIR.search(entry.base_name)
        if entry.type == pafs.FileType.Directory and match:
            steps.append((int(match.group(1)), entry.base_name))
    if not steps:
        raise FileNotFoundError(f"{source}: no checkpoint-* directory (has this run saved a checkpoint yet?)")
    skipped, registered = [], ray_registered(source)
    for _, name in sorted(steps, reverse=True):
        uri = storage.join(source, name)
        problem = checkpoint_problem(uri, registered)
        if problem is None:
            return uri
        log.warning("skipping %s: an incomplete checkpoint (%s)", uri, problem)
        skipped.append(name)
    raise FileNotFoundError(f"{source}: no complete checkpoint (incomplete: {', '.join(skipped)})")
