"""Configuration: the typed config tree and its YAML loader."""

from vistralv_ray.config.loader import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)
from vistralv_ray.config.schema import REFERENCE_BATCH, Config

__all__ = [
    "REFERENCE_BATCH",
    "Config",
    "ConfigError",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_override",
]
