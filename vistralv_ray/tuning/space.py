"""Search spaces: the plain YAML files in tune_spaces/, checked and turned into Tune objects and trial configs.

A space says which config keys vary and how (`loguniform`, `uniform`, `choice`, `grid`), what every
trial fixes (`trial`: worker count, steps, eval cadence), the scheduler (ASHA on a metric) and how many
samples to draw. A mistake is a ConfigError that starts with the key, like the config loader's.
The recipe (jobs/*.yaml) stays the single source of everything else: a space only applies to it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vistralv_ray.config import Config, ConfigError, config_from_dict

DOMAINS = ("loguniform", "uniform", "choice", "grid")
SCHEDULERS = ("asha", "fifo")
TOP_LEVEL_KEYS = ("name", "samples", "trial", "search", "scheduler")
SCHEDULER_KEYS = ("name", "metric", "mode", "grace_period", "reduction_factor", "max_t")
# The sweep sets these for every trial (its own run under the sweep directory, grouped by sweep).
SWEEP_OWNED_KEYS = ("run.name", "run.storage", "run.wandb_group")


@dataclass(frozen=True)
class Domain:
    """How one config key varies: bounds for `loguniform` / `uniform`, options for `choice` / `grid`."""

    kind: str
    values: tuple

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def probes(self) -> list:
        """Values that must each make a valid config: the bounds or every option."""
        return list(self.values)


@dataclass
class SchedulerSpec:
    name: str = "asha"
    metric: str = "eval_loss"
    mode: str = "min"
    # In reports (Tune's training_iteration): a trial is never stopped before this many.
    grace_period: int = 1
    reduction_factor: float = 3.0
    # None: the number of reports a trial makes (derived from the recipe's planned steps).
    max_t: int | None = None


@dataclass
class SearchSpace:
    name: str
    search: dict[str, Domain]
    trial: dict[str, Any] = field(default_factory=dict)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    samples: int = 1
    source: str = "<dict>"

    def param_space(self) -> dict:
        """Tune's param_space: one entry per varied dotted key."""
        return {key: domain.to_tune() for key, domain in self.search.items()}

    def recipe(self, base: Config) -> dict:
        """The base config as a tree with the space's fixed `trial` settings applied (no sampled value yet)."""
        return set_dotted(dataclasses.asdict(base), self.trial)


def set_dotted(tree: dict, values: dict[str, Any]) -> dict:
    """A copy of `tree` with each dotted key of `values` set."""
    out = copy.deepcopy(tree)
    for dotted, value in values.items():
        node = out
        *sections, leaf = dotted.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def trial_config(recipe: dict, params: dict, run_name: str, storage: str, group: str) -> Config:
    """The typed config of one trial: the recipe, its sampled values, and its own run under the sweep."""
    owned = dict(zip(SWEEP_OWNED_KEYS, (run_name, storage, group), strict=True))
    return config_from_dict(set_dotted(recipe, {**params, **owned}))


def check_against(space: SearchSpace, recipe: dict) -> None:
    """Every bound and option of the space must give a valid config of this recipe; errors name the key."""
    try:
        config_from_dict(recipe)
    except ConfigError as e:
        raise ConfigError(f"trial.{e} (the recipe with the space's trial settings, {space.source})") from e
    for key, domain in space.search.items():
        for value in domain.probes():
            try:
                config_from_dict(set_dotted(recipe, {key: value}))
            except ConfigError as e:
                raise ConfigError(f"search.{key}: {value!r} does not fit the recipe: {e} ({space.source})") from e


def load_space(path: str | Path) -> SearchSpace:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    return space_from_dict(data, source=str(p), default_name=p.stem)


def space_from_dict(data: Any, source: str = "<dict>", default_name: str = "sweep") -> SearchSpace:
    """Check a space declaration; every error starts with the offending key."""

    def fail(key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{key}: {message} ({source})")

    if not isinstance(data, dict):
        fail("top level", "a search space is a mapping with keys " + ", ".join(TOP_LEVEL_KEYS))
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        fail(unknown[0], f"unknown key; known keys: {', '.join(TOP_LEVEL_KEYS)}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
        fail("name", f"{name!r}; allowed: letters, digits, '-' and '_' (it names the trials' runs)")
    samples = data.get("samples", 1)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        fail("samples", f"{samples!r}; allowed: an integer >= 1")

    search = data.get("search")
    if not isinstance(search, dict) or not search:
        fail("search", "must map at least one config key to a domain, e.g. train.base_lr: {loguniform: [1e-5, 1e-2]}")
    domains = {}
    for key, spec in search.items():
        _check_config_key(f"search.{key}", str(key), fail)
        domains[str(key)] = _domain(f"search.{key}", spec, fail)

    trial = data.get("trial") or {}
    if not isinstance(trial, dict):
        fail("trial", "must map config keys to the value every trial uses, e.g. scaling.workers: 1")
    for key in trial:
        _check_config_key(f"trial.{key}", str(key), fail)
        if key in domains:
            fail(f"trial.{key}", "is also in search; a key is either fixed or searched")

    return SearchSpace(
        name=name,
        search=domains,
        trial={str(k): v for k, v in trial.items()},
        scheduler=_scheduler(data.get("scheduler") or {}, fail),
        samples=samples,
        source=source,
    )


def _check_config_key(where: str, dotted: str, fail) -> None:
    if dotted in SWEEP_OWNED_KEYS:
        fail(where, "is set by the sweep for every trial (its own run under --workdir); remove it")
    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        section = ".".join(parts[:i]) or "top level"
        if not dataclasses.is_dataclass(cls):
            fail(where, f"{section} is not a section")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(cls))
            fail(where, f"unknown config key; known keys in {section}: {known}")
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        fail(where, f"{dotted} is a section; name one of its keys")


def _number(key: str, value: Any, fail) -> float:
    if isinstance(value, str):
        try:
            value = float(value)  # YAML reads "1e-3" (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(key, f"{value!r} is not a finite number")
    return float(value)


def _domain(key: str, spec: Any, fail) -> Domain:
    if not isinstance(spec, dict) or len(spec) != 1:
        fail(key, f"expected one of {', '.join(DOMAINS)} as a mapping, e.g. {{loguniform: [1.0e-5, 1.0e-2]}}")
    ((kind, values),) = spec.items()
    if kind not in DOMAINS:
        fail(f"{key}.{kind}", f"unknown domain; allowed: {', '.join(DOMAINS)}")
    where = f"{key}.{kind}"
    if not isinstance(values, list) or not values:
        fail(where, "expected a non-empty list")
    if kind in ("loguniform", "uniform"):
        if len(values) != 2:
            fail(where, f"expected [low, high], got {values!r}")
        low, high = (_number(where, v, fail) for v in values)
        if not low < high:
            fail(where, f"low {low:g} must be below high {high:g}")
        if kind == "loguniform" and low <= 0:
            fail(where, f"low {low:g} must be > 0 on a log scale")
        return Domain(kind, (low, high))
    if len(set(map(repr, values))) != len(values):
        fail(where, f"repeated values in {values!r}")
    return Domain(kind, tuple(values))


def _scheduler(spec: Any, fail) -> SchedulerSpec:
    if not isinstance(spec, dict):
        fail("scheduler", f"expected a mapping with keys {', '.join(SCHEDULER_KEYS)}")
    unknown = sorted(set(spec) - set(SCHEDULER_KEYS))
    if unknown:
        fail(f"scheduler.{unknown[0]}", f"unknown key; known keys: {', '.join(SCHEDULER_KEYS)}")
    out = SchedulerSpec(**{k: v for k, v in spec.items() if v is not None})
    if out.name not in SCHEDULERS:
        fail("scheduler.name", f"{out.name!r}; allowed: {', '.join(SCHEDULERS)}")
    if not isinstance(out.metric, str) or not out.metric:
        fail("scheduler.metric", f"{out.metric!r}; expected a reported metric name such as eval_loss")
    if out.mode not in ("min", "max"):
        fail("scheduler.mode", f"{out.mode!r}; allowed: 'min', 'max'")
    for key in ("grace_period", "max_t"):
        value = getattr(out, key)
        if value is None and key == "max_t":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(f"scheduler.{key}", f"{value!r}; allowed: an integer >= 1")
    out.reduction_factor = _number("scheduler.reduction_factor", out.reduction_factor, fail)
    if out.reduction_factor <= 1:
        fail("scheduler.reduction_factor", f"{out.reduction_factor:g}; allowed: > 1")
    if out.max_t is not None and out.max_t < out.grace_period:
        fail("scheduler.max_t", f"{out.max_t} is below scheduler.grace_period {out.grace_period}")
    return out
