"""Configuration: the typed config tree and its YAML loader."""

from vistralv_ray.config.loader import (
    ConfigError,
    check_projector_start,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)
from vistralv_ray.config.schema import RANDOM_PROJECTOR, REFERENCE_BATCH, Config

__all__ = [
    "RANDOM_PROJECTOR",
    "REFERENCE_BATCH",
    "Config",
    "ConfigError",
    "check_projector_start",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_override",
]
