"""One rank-aware logger for library code: rank 0 logs at INFO, other ranks only warnings and errors."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s [vistralv%(rank)s] %(message)s"


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = current_rank()
        record.rank = "" if rank is None else f" rank {rank}"
        return rank in (None, 0) or record.levelno >= logging.WARNING


def current_rank() -> int | None:
    value = os.environ.get("RANK")
    return int(value) if value is not None and value.isdigit() else None


def get_logger(name: str) -> logging.Logger:
    root = logging.getLogger("vistralv_ray")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("VISTRALV_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logging.getLogger(name if name.startswith("vistralv_ray") else f"vistralv_ray.{name}")
