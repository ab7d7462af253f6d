"""Where a run's processes ran: each train worker and each preprocessing actor writes its Ray node id
once, when it starts, to `<run>/placement/` (one small JSON file each, local or s3://).

On a heterogeneous cluster (trainer nodes with GPUs, CPU nodes for preprocessing; `scaling.resources_per_worker`
and `data.preprocess_resources` name them) this is the record that placement went as asked, from inside
the processes themselves; an elastic run adds one train file per rank for every size it ran at. Written
at start only: nothing on the per-batch path.
"""

from __future__ import annotations

import json
import os
import time
import uuid

from vistralv_ray.data import storage
from vistralv_ray.logging import get_logger

log = get_logger(__name__)

PLACEMENT_DIR = "placement"


def record_node(placement_uri: str, role: str, **extra) -> bool:
    """Write this process's node id (and `extra`: rank, world size) under `placement_uri`.

    A diagnostic record: a write that fails (storage down, access denied) is a warning, never a
    failed worker or actor (which would spend the run's `max_failures` on a log file). Returns
    whether it was written."""
    import ray

    ctx = ray.get_runtime_context()
    entry = {
        "role": role,
        "node_id": ctx.get_node_id(),
        "pid": os.getpid(),
        "time": time.time(),
        **extra,
    }
    name = f"{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    try:
        storage.write_bytes(storage.join(placement_uri, name), json.dumps(entry).encode())
    except Exception as e:  # noqa: BLE001 - any storage fault: the run goes on without this record
        log.warning("placement: could not record the %s node under %s: %s", role, placement_uri, e)
        return False
    return True


def read_placement(placement_uri: str) -> list[dict]:
    """Every entry written under `placement_uri`, oldest first ([] when there is none)."""
    names = [
        u for u in storage.list_tree(placement_uri) if u.endswith(".json") and not u.rsplit("/", 1)[-1].startswith(".")
    ]
    entries = [json.loads(storage.read_bytes(uri)) for uri in names]
    return sorted(entries, key=lambda e: e["time"])
