"""What a checkpoint holds besides DeepSpeed's shards: trainer state, data position, projector, tokenizer.

Layout of one checkpoint directory (every rank writes its part, Ray merges them):
  deepspeed/<tag>/...        DeepSpeed shards (trainable parameters, optimizer, LR schedule)
  trainer_state.json         step, epoch, the plan it was trained under (rank 0)
  seen/rank-<r>.npy          keys (shard row) of the records each rank trained on in the current epoch
  rng/rank-<r>.pt            each rank's python, numpy, torch (and CUDA) RNG states
  projector.safetensors      the projector alone, to start a finetune from an align run (rank 0)
  tokenizer/                 tokenizer with <image> and the chat template used in training (rank 0)
  config.yaml, run.json      the resolved config and the training precision: export needs nothing else
  checkpoint_complete.json   written last, by rank 0, once every rank's part is in storage
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vistralv_ray.data.runs import COMPLETE_FILE, STATE_FILE, complete_marker
from vistralv_ray.logging import get_logger

log = get_logger(__name__)


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    total_steps: int = 0
    tag: str | None = None
    epoch_samples: int = 0  # samples trained in the current epoch, over all ranks
    # Records consumed since the run began, over all ranks and restarts: the LR schedule's position,
    # and what ends the run (an elastic run's steps have different sizes).
    samples_seen: int = 0
    saved_at: float = 0.0  # wall-clock time of the save: a restart reports the seconds it lost since then
    seen_keys: set[int] = field(default_factory=set)  # this rank's records of the current epoch
    plan: dict = field(default_factory=dict)  # PLAN_KEYS of the run that wrote it (checked on resume)

    def save(self, directory: Path, rank: int) -> None:
        seen_dir = directory / "seen"
        seen_dir.mkdir(parents=True, exist_ok=True)
        np.save(seen_dir / f"rank-{rank}.npy", np.fromiter(self.seen_keys, dtype=np.uint64, count=len(self.seen_keys)))
        if rank == 0:
            meta = {k: v for k, v in asdict(self).items() if k != "seen_keys"}
            (directory / STATE_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path) -> TrainerState:
        meta = json.loads((directory / STATE_FILE).read_text())
        # Checkpoints from before the sample count: every step had the planned global batch.
        meta.setdefault("samples_seen", meta.get("step", 0) * meta.get("plan", {}).get("global_batch", 0))
        seen: set[int] = set()
        for f in sorted((directory / "seen").glob("rank-*.npy")):
            seen.update(int(k) for k in np.load(f))
        return cls(**meta, seen_keys=seen)


# What a resumed run must share with its checkpoint: with another value the schedule is re-timed or the
# restored optimizer and LRs belong to another batch size.
# An elastic run may resume at another world size: its global batch and LRs then follow from the
# policy (see `resume_changes`).
PLAN_KEYS = ("total_steps", "total_samples", "world_size", "global_batch", "base_lr", "effective_lr", "projector_lr")


def plan_changes(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every plan key whose value differs (keys a checkpoint lacks are skipped)."""
    changes = []
    for key in PLAN_KEYS:
        if key not in saved or key not in current:
            continue
        old, new = saved[key], current[key]
        same = math.isclose(old, new, rel_tol=1e-9, abs_tol=0.0) if isinstance(old, float) else old == new
        if not same:
            changes.append(f"{key}: {old:g} -> {new:g}" if isinstance(old, float) else f"{key}: {old} -> {new}")
    return changes


def resume_plan(cfg, total_steps: int, workers: int | None = None) -> dict:
    """The PLAN_KEYS of a run at `workers` workers (default: the planned scaling.workers).

    total_steps and total_samples are the run's plan at its planned size; the rest are what the
    elastic policy makes of `workers` (the planned values at the planned size)."""
    from vistralv_ray.training.scaling import lr_plan

    lr, planned = lr_plan(cfg, workers), lr_plan(cfg)
    return {
        "total_steps": total_steps,
        "total_samples": total_steps * planned.global_batch,
        "world_size": lr.workers,
        "global_batch": lr.global_batch,
        "base_lr": lr.base_lr,
        "effective_lr": lr.effective_lr,
        "projector_lr": lr.projector_lr,
    }


def resume_changes(cfg, saved: dict, current: dict) -> list[str]:
    """`plan_changes` of a resume, where an elastic run's other world size is no change: a checkpoint
    written at another size (within min_workers..workers) must hold what the policy gives at that
    size. A fixed-size run, or a change the policy does not explain (base LR, steps, rule), is one."""
    from vistralv_ray.training.scaling import elastic_workers

    saved_world = saved.get("world_size")
    if (
        cfg.scaling.min_workers is not None
        and saved_world != current.get("world_size")
        and saved_world in elastic_workers(cfg)
    ):
        current = resume_plan(cfg, current["total_steps"], saved_world)
    return plan_changes(saved, current)


def mark_reported_checkpoint_complete(step: int, dir_name: str) -> None:
    """Rank 0, once every rank's `ray.train.report(checkpoint=...)` has returned (a synchronous report
    returns after that rank's upload): write the checkpoint's completeness marker into run storage.
    A failed write is a warning, not a failed run: Ray has registered the checkpoint, which also
    makes it complete to readers (`data.runs.checkpoint_problem`)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()  # the reported checkpoint, where Ray persisted it
    if checkpoint is None or not checkpoint.path.rstrip("/").endswith(dir_name):
        return  # Ray Train's local mode keeps no run storage
    marker = f"{checkpoint.path.rstrip('/')}/{COMPLETE_FILE}"
    try:
        with checkpoint.filesystem.open_output_stream(marker) as f:
            f.write(complete_marker(step))
    except OSError as e:
        log.warning("could not write %s (the checkpoint stays usable as one Ray registered): %s", marker, e)


def save_rng_state(directory: Path, rank: int) -> None:
    """This rank's RNG states, as tensors and plain numbers only: they load with torch's
    `weights_only=True`, never by unpickling arbitrary objects."""
    import random

    import torch

    version, internal, gauss = random.getstate()
    key, mt, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [key, torch.from_numpy(mt.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    (directory / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "rng" / f"rank-{rank}.pt")


def restore_rng_state(directory: Path, rank: int) -> bool:
    """This rank's RNG states as they were at the checkpoint; False when the checkpoint has none for it."""
    import random

    import torch

    path = directory / "rng" / f"rank-{rank}.pt"
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=True)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    key, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((key, mt.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True
