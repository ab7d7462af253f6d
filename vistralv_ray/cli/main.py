"""Entry point of `vistralv-ray`: builds the sub-command parser from the command modules."""

from __future__ import annotations

import argparse
import sys

from vistralv_ray.cli import assets, bench, data, infer, quickstart, train, tune

# Each module has `register(subparsers)`; its parsers set `func` to the function that runs them.
COMMAND_MODULES = [assets, data, train, tune, infer, quickstart, bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vistralv-ray",
        description="Train Vistral-V (Vietnamese LLaVA) with Ray Data, Ray Train + DeepSpeed and Ray Tune.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from vistralv_ray.config import ConfigError
    from vistralv_ray.errors import RecordError, StorageError
    from vistralv_ray.ray_runtime import use_cluster

    use_cluster(getattr(args, "address", None))
    try:
        return int(args.func(args) or 0)
    except (ConfigError, RecordError, StorageError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
