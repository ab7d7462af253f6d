"""Options that several sub-commands share."""

from __future__ import annotations

import argparse


def add_ray_address(p: argparse.ArgumentParser) -> None:
    """`--address`: the Ray cluster to use. Without it (and without RAY_ADDRESS) the command starts its own
    embedded Ray, never one that `ray start` left running or left behind."""
    p.add_argument(
        "--address",
        help="Ray cluster to use, as RAY_ADDRESS (e.g. 127.0.0.1:6379, ray://head:10001); "
        "default: RAY_ADDRESS if set, otherwise an embedded local Ray",
    )
