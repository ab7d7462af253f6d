"""Test hooks in the training worker: fault injection and the logits probe.

They do nothing unless a test sets their environment variable (or the driver puts the probe's path
in the plan). The variables are read on the workers, so a test sets them before Ray starts them.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vistralv_ray.config.schema import Config
from vistralv_ray.data.packing import TrainBatch
from vistralv_ray.logging import get_logger

log = get_logger(__name__)

# Tests: kill rank 1 once, in the step after the checkpoint of this step (by then Ray has
# registered that checkpoint, so the restart must resume from it).
FAULT_ENV = "VISTRALV_INJECT_FAULT_AFTER_CHECKPOINT"
# Tests: "STEP:SECONDS[:WORKERS]", comma-separated: every rank sleeps SECONDS in the step after the
# checkpoint of STEP when the group has WORKERS workers (default scaling.workers), so that a test can
# take a node away or add one while the group is mid-epoch (the elastic tests). A resize ends the sleep.
PAUSE_ENV = "VISTRALV_PAUSE_AFTER_CHECKPOINT"
# Tests: after the last step, rank 0 saves one of its batches and the logits the trained engine gives
# for it to this file (the driver reads the variable), so an export can be compared with the trainer's model.
PROBE_ENV = "VISTRALV_SAVE_PROBE_LOGITS"


def maybe_inject_fault(step: int, rank: int, world: int, cfg: Config, plan: dict) -> None:
    """Called after every optimizer step: pauses every rank (PAUSE_ENV) or kills rank 1 (FAULT_ENV) once."""
    for pause in filter(None, os.environ.get(PAUSE_ENV, "").split(",")):
        after, seconds, *size = pause.split(":")
        if int(after) + 1 == step and world == (int(size[0]) if size else cfg.scaling.workers):
            log.warning("pausing %s s in step %d at %d workers (%s)", seconds, step, world, PAUSE_ENV)
            time.sleep(float(seconds))
    target = os.environ.get(FAULT_ENV)
    marker = Path(plan["run_dir_local"] or tempfile.gettempdir()) / f".fault-injected-{plan['run_name']}"
    if target and int(target) + 1 == step and rank == min(1, world - 1) and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(step))
        log.warning("injecting a worker failure in step %d (%s)", step, FAULT_ENV)
        # Ray's controller registers a reported checkpoint when it next polls the workers; a
        # worker that dies within milliseconds of its report can lose it. Real faults are not
        # that punctual: wait as long as a few polls take.
        time.sleep(5)
        os._exit(1)


@torch.no_grad()
def maybe_save_probe(
    plan: dict, engine, first_batch: Callable[[], TrainBatch], dtype: torch.dtype, device: torch.device, rank: int
) -> None:
    """After the last step, when the plan names a probe file: rank 0 saves a batch and its logits."""
    target = plan.get("probe_logits_path")
    if not target:
        return
    from vistralv_ray.training.step import forward_logits

    batch = first_batch()
    engine.eval()
    # Every rank runs its forward (ZeRO-3 gathers parameters collectively); rank 0 keeps its own.
    logits = forward_logits(engine, batch.to(device), dtype).float().cpu()
    if rank == 0:
        torch.save({"batch": batch, "logits": logits}, target)
