"""The layout of a run directory in storage: checkpoint directories and the files that name them.

A run is `<storage>/<name>/` holding `checkpoint-NNNNNN/` directories (see `training.checkpointing`
for what one holds). This sits beside `storage` so that every layer (the model's projector loader,
export, the driver) finds checkpoints without importing the training layer.
"""

from __future__ import annotations

import re

from vistralv_ray.data import storage

STATE_FILE = "trainer_state.json"
DEEPSPEED_DIR = "deepspeed"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run.json"
_CHECKPOINT_DIR = re.compile(r"checkpoint[-_](\d+)$")


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
