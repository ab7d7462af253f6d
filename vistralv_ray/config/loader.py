"""Load the config tree from YAML and `--set a.b=value` overrides, type-check it and write it back.

Every error names the dotted key and what is allowed, so a typo in a recipe never becomes a silent
default. Ray hands `train_loop_config` to workers as a dict: `config_from_dict` rebuilds the tree.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vistralv_ray.config.schema import RANDOM_PROJECTOR, Config


class ConfigError(ValueError):
    """A config key with a value it cannot take; the message names the key."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping of name to number"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp` or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        for a in allowed:
            # `True == 1` in Python: compare types too so `1` is not taken for `True`.
            if value == a and type(value) is type(a):
                return a
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted off/on/no/yes as a boolean: `wandb: off` means "off".
            for word in _YAML_BOOL_WORDS[value]:
                if word in allowed:
                    return word
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        literal_args = [a for a in typing.get_args(tp) if typing.get_origin(a) is Literal]
        if literal_args and len(errors) == len(typing.get_args(tp)):
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, val_tp) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-3" (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = prefix or "top level"
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key in {where}; known keys: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(f"{prefix}.{name}" if prefix else name, data[name], hints[name])
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


# train.benchmark.max_questions, at most (the images go to every worker with the run's plan).
MAX_BENCHMARK_QUESTIONS = 1024
_YAML_BOOL_WORDS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so numbers, booleans and lists work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.base_lr=2e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if raw.startswith("@"):
        return key, _value_from_file(key, raw[1:])
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _value_from_file(key: str, path: str) -> Any:
    """`train.base_lr=@sweep/best.json` takes the field of the same name from a JSON file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}: file {p} given with @ does not exist")
    data = json.loads(p.read_text())
    leaf = key.split(".")[-1]
    if leaf not in data:
        raise ConfigError(f"{key}: {p} has no field {leaf!r} (fields: {', '.join(data)})")
    return data[leaf]


def config_from_dict(data: dict | None, overrides: list[str] | None = None) -> Config:
    tree = json.loads(json.dumps(data or {}))  # deep copy, also of plain YAML scalars
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return config_from_dict(data, overrides)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def check_projector_start(cfg: Config) -> None:
    """Before a training run starts: a finetune begins from the stage-1 projector, never from a random
    one by accident. (Not part of `validate`: `plan`, `prepare --config` and export read finetune
    recipes and runs without needing the align run.)"""
    m = cfg.model
    _require(
        cfg.train.stage != "finetune" or bool(m.init_projector_from),
        "model.init_projector_from",
        "train.stage=finetune needs the projector learned in stage 1: set it to the align run's name under "
        "run.storage, its run directory, a checkpoint or a projector.safetensors file (local or s3://); "
        f"'{RANDOM_PROJECTOR}' starts from a freshly initialised projector on purpose",
    )


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    m, d, t, s = cfg.model, cfg.data, cfg.train, cfg.scaling
    _require(m.max_length >= 16, "model.max_length", f"{m.max_length} is too small; allowed: >= 16")
    _require(m.image_size is None or m.image_size > 0, "model.image_size", "must be > 0 or null")
    _require(m.lora.r > 0, "model.lora.r", "must be > 0")
    _require(0.0 <= m.lora.dropout < 1.0, "model.lora.dropout", "allowed: 0 <= dropout < 1")
    _require(bool(m.lora.target_modules), "model.lora.target_modules", "must name at least one module")
    _require(
        not (m.lora.enabled and t.stage == "align"),
        "model.lora.enabled",
        "LoRA adapts the language model, which align keeps frozen; allowed only with train.stage=finetune",
    )
    _require(d.per_device_batch >= 1, "data.per_device_batch", f"{d.per_device_batch}; allowed: >= 1")
    _require(
        d.pack_length is None or d.pack_length >= m.max_length,
        "data.pack_length",
        f"{d.pack_length} cannot hold a sample of model.max_length {m.max_length}; allowed: null or >= {m.max_length}",
    )
    _require(d.max_image_pixels > 0, "data.max_image_pixels", "must be > 0")
    _require(d.max_message_chars > 0, "data.max_message_chars", "must be > 0")
    _require(d.max_record_chars > 0, "data.max_record_chars", "must be > 0")
    _require(d.preprocess_actors >= 1, "data.preprocess_actors", "allowed: >= 1")
    _require(d.preprocess_cpus_per_actor > 0, "data.preprocess_cpus_per_actor", "must be > 0")
    _require(d.prefetch_batches >= 0, "data.prefetch_batches", "allowed: >= 0")
    _require(d.map_batch_size >= 1, "data.map_batch_size", "allowed: >= 1")
    _require(d.shuffle_row_groups >= 1, "data.shuffle_row_groups", "allowed: >= 1")
    _require(d.shuffle_buffer >= 0, "data.shuffle_buffer", "allowed: >= 0 (rows per worker; 0 turns it off)")
    _require(d.max_block_mb >= 1, "data.max_block_mb", "allowed: >= 1 (MB)")
    _require(t.epochs >= 1, "train.epochs", f"{t.epochs}; allowed: >= 1")
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "allowed: null or >= 1")
    _require(t.grad_accum >= 1, "train.grad_accum", "allowed: >= 1")
    _require(t.base_lr > 0, "train.base_lr", f"{t.base_lr}; allowed: > 0")
    _require(t.reference_batch is None or t.reference_batch >= 1, "train.reference_batch", "allowed: null or >= 1")
    _require(t.projector_lr_scale > 0, "train.projector_lr_scale", "must be > 0")
    _require(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", f"{t.warmup_ratio}; allowed: 0 <= ratio < 1")
    _require(t.weight_decay >= 0, "train.weight_decay", "allowed: >= 0")
    _require(t.grad_clip >= 0, "train.grad_clip", "allowed: >= 0 (0 turns clipping off)")
    _require(
        len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), "train.adam_betas", "two numbers in [0, 1)"
    )
    _require(
        not t.offload_params or t.zero_stage == 3, "train.offload_params", "parameter offload needs train.zero_stage=3"
    )
    _require(
        t.zero3_persistence_threshold is None or t.zero3_persistence_threshold >= 0,
        "train.zero3_persistence_threshold",
        "allowed: null or >= 0 (elements)",
    )
    _require(
        t.precision != "fp16",
        "train.precision",
        "fp16 is not supported: its loss scaler skips optimizer steps on overflow, which would leave the "
        "step count and LR schedule out of step with the data; use bf16 (A100, H100) or fp32",
    )
    _require(t.checkpoint_every >= 1, "train.checkpoint_every", "allowed: >= 1")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "allowed: >= 1")
    _require(t.eval_every is None or t.eval_every >= 1, "train.eval_every", "allowed: null or >= 1")
    _require(t.log_every >= 1, "train.log_every", "allowed: >= 1")
    b = t.benchmark
    _require(b.name is None or bool(b.data), "train.benchmark.data", f"train.benchmark.name={b.name} needs its file")
    _require(b.data is None or b.name is not None, "train.benchmark.name", "train.benchmark.data is set: name it")
    _require(b.every_steps is None or b.every_steps >= 1, "train.benchmark.every_steps", "allowed: null or >= 1")
    # Every question's image travels to every worker in the run's plan: a subset, not a test set.
    _require(
        1 <= b.max_questions <= MAX_BENCHMARK_QUESTIONS,
        "train.benchmark.max_questions",
        f"{b.max_questions}; allowed: 1 to {MAX_BENCHMARK_QUESTIONS} (`vistralv-ray eval --benchmark` for a whole set)",
    )
    _require(b.max_new_tokens >= 1, "train.benchmark.max_new_tokens", f"{b.max_new_tokens}; allowed: >= 1")
    _require(s.workers >= 1, "scaling.workers", f"{s.workers}; allowed: >= 1")
    _require(s.cpus_per_worker >= 0, "scaling.cpus_per_worker", "allowed: >= 0")
    _require(s.max_failures >= -1, "scaling.max_failures", "allowed: -1 (forever) or >= 0")
    _require(
        s.min_workers is None or 1 <= s.min_workers <= s.workers,
        "scaling.min_workers",
        f"{s.min_workers}; allowed: null (fixed size) or 1 <= min_workers <= scaling.workers ({s.workers})",
    )
    _require(s.resize_interval_s >= 0, "scaling.resize_interval_s", "allowed: >= 0 (seconds)")
    _require(
        s.min_workers is None or s.min_workers == s.workers or s.max_failures != 0,
        "scaling.max_failures",
        "an elastic run (scaling.min_workers set) shrinks by restarting after a worker is lost: allowed: -1 or >= 1",
    )
    _require(bool(cfg.run.storage), "run.storage", "must not be empty")
    if cfg.run.name is not None:
        _require(
            cfg.run.name.replace("-", "").replace("_", "").replace(".", "").isalnum(),
            "run.name",
            f"{cfg.run.name!r}; allowed: letters, digits, '-', '_', '.'",
        )
