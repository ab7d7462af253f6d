"""What a checkpoint holds besides DeepSpeed's shards: trainer state, data position, projector, tokenizer.

Layout of one checkpoint directory (every rank writes its part, Ray merges them):
  deepspeed/<tag>/...        DeepSpeed shards (trainable parameters, optimizer, LR schedule)
  trainer_state.json         step, epoch, planned steps (rank 0)
  seen/rank-<r>.npy          keys of the records each rank trained on in the current epoch
  projector.safetensors      the projector alone, to start a finetune from an align run (rank 0)
  tokenizer/                 tokenizer with <image> and the chat template used in training (rank 0)
  config.yaml, run.json      the resolved config and the training precision: export needs nothing else
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vistralv_ray.data import storage

STATE_FILE = "trainer_state.json"
DEEPSPEED_DIR = "deepspeed"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run.json"
_CHECKPOINT_DIR = re.compile(r"checkpoint[-_](\d+)$")


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    total_steps: int = 0
    tag: str | None = None
    epoch_samples: int = 0  # samples trained in the current epoch, over all ranks
    seen_keys: set[int] = field(default_factory=set)  # this rank's records of the current epoch

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
        seen: set[int] = set()
        for f in sorted((directory / "seen").glob("rank-*.npy")):
            seen.update(int(k) for k in np.load(f))
        return cls(**meta, seen_keys=seen)


def latest_checkpoint_uri(source: str) -> str:
    """A checkpoint directory as given, or the newest `checkpoint-NNNNNN` of a run directory."""
    if storage.exists(storage.join(source, STATE_FILE)):
        return source.rstrip("/")
    import pyarrow.fs as pafs

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
    return storage.join(source.rstrip("/"), max(steps)[1])
