"""Preflight: recipe mistakes that would fail a run after it has paid for GPUs, caught in seconds before.

The driver calls `run_preflight` first thing in `build_trainer`; `jobs/submit.py` runs the same checks
on the laptop before it uploads anything. Every error is a `ConfigError` that names the key and the fix.

What is checked:
- placeholder URIs left from the recipes (`s3://my-bucket/...`) in data.train, data.eval, run.storage;
- local shard directories that `prepare` did not finish (no manifest.json);
- shards of `prepare --store-pixels` (local or s3://) holding images at another size, aspect or pad
  colour than the recipe's model decodes to;
- `run.wandb: online` without W&B credentials (WANDB_API_KEY or a `wandb login` netrc entry);
- `scaling.use_gpu: auto` on a cluster that starts at zero GPU nodes: resolved from the cluster's node
  types (the launcher's autoscaling config) or, where none can be read, an explicit value is required;
- per-worker and per-actor resources that no node type of the cluster offers (Ray would wait forever).
"""

from __future__ import annotations

import dataclasses
import json
import netrc
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import yaml

from vistralv_ray.config.loader import ConfigError
from vistralv_ray.config.schema import Config
from vistralv_ray.data import storage
from vistralv_ray.logging import get_logger

log = get_logger(__name__)

# Bucket names and markers the recipes, docs and examples use for "put yours here".
PLACEHOLDER_BUCKETS = {"my-bucket", "your-bucket", "bucket", "bucket-name", "example-bucket", "mybucket"}
PLACEHOLDER_MARKER = re.compile(r"<[^>]*>|YOUR[_-]|CHANGE[_-]?ME|REPLACE[_-]?ME|\bTODO\b|\bXXX\b", re.IGNORECASE)
# The cluster launcher copies the cluster config here on the head node (inside its container); the
# driver of a job submitted to a launcher cluster runs on the head and reads its node types from it.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
WANDB_DEFAULT_HOST = "api.wandb.ai"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class NodeType:
    """What one kind of node offers Ray, and how many of it the cluster may have (None: unknown)."""

    name: str
    resources: dict[str, float]
    max_count: int | None = None


# ---- recipe checks that need no cluster --------------------------------------------------------------


def placeholder_in(uri: str) -> bool:
    """True for URIs that still hold a recipe's example bucket or a "replace me" marker."""
    if PLACEHOLDER_MARKER.search(uri):
        return True
    parsed = urlparse(uri)
    return parsed.scheme == "s3" and parsed.netloc.lower() in PLACEHOLDER_BUCKETS


def check_placeholders(cfg: Config) -> None:
    keyed = [("data.train", u) for u in cfg.data.train] + [("data.eval", u) for u in cfg.data.eval]
    for key, uri in keyed + [("run.storage", cfg.run.storage)]:
        if placeholder_in(uri):
            raise ConfigError(
                f"{key}: {uri} is the recipe's placeholder; set your own location, e.g. "
                f"--set {key}={'[s3://<bucket>/...]' if key != 'run.storage' else 's3://<bucket>/...'}"
            )


def check_local_shards(cfg: Config, base: Path | None = None, missing_ok: bool = False) -> None:
    """Local data paths exist and hold complete `prepare` outputs (a manifest.json per shard folder).

    `missing_ok`: a path that does not exist here is not an error (it may exist on the cluster's nodes).
    """
    base = base or Path.cwd()
    for key, uris in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for uri in uris:
            if storage.is_s3(uri) or storage.is_glob(uri) or "://" in uri:
                continue
            path = Path(uri).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.exists():
                if missing_ok:
                    continue
                raise ConfigError(f"{key}: {uri} does not exist (looked in {path})")
            if path.is_dir() and not any(path.rglob(storage.SHARD_MANIFEST)):
                raise ConfigError(
                    f"{key}: {path} has no {storage.SHARD_MANIFEST}: it is not a finished `vistralv-ray prepare` "
                    "output (prepare writes the manifest last); prepare the data again into it"
                )
            try:
                storage.list_parquet([str(path)])
            except FileNotFoundError as e:
                raise ConfigError(f"{key}: {e}") from None


def has_wandb_credentials(environ: dict[str, str] | None = None, netrc_path: Path | None = None) -> bool:
    """WANDB_API_KEY, or the netrc entry `wandb login` writes for the W&B host."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or f"https://{WANDB_DEFAULT_HOST}").hostname or WANDB_DEFAULT_HOST
    path = netrc_path or Path(environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_wandb(cfg: Config, environ: dict[str, str] | None = None, netrc_path: Path | None = None) -> None:
    if cfg.run.wandb == "online" and not has_wandb_credentials(environ, netrc_path):
        raise ConfigError(
            "run.wandb: online needs W&B credentials where the run starts: set WANDB_API_KEY (on a cluster: "
            "a Kubernetes secret, or `jobs/submit.py --env WANDB_API_KEY`) or run `wandb login`; "
            "or --set run.wandb=offline (or off)"
        )


# What decides each field of a manifest's `pixels` on the recipe's side.
PIXELS_RECIPE_KEY = {
    "size": "model.image_size",
    "aspect": "model.aspect",
    "fill": "model.vision_tower (its image_mean is the pad colour)",
    "resample": "training's bicubic, the exported processor's filter",
}


def _data_manifests(uri: str, base: Path) -> list[str]:
    """The manifests of the shard folders a data path names (a shard file: its folder's, if any)."""
    if storage.is_glob(uri) or ("://" in uri and not storage.is_s3(uri)):
        return []
    if not storage.is_s3(uri):
        path = Path(uri).expanduser()
        uri = str(path if path.is_absolute() else base / path)
    if uri.endswith(".parquet"):
        folder = uri.rsplit("/", 1)[0]
        return [storage.join(folder, storage.SHARD_MANIFEST)] if storage.exists(uri) else []
    return [u for u in storage.list_tree(uri) if u.rsplit("/", 1)[-1] == storage.SHARD_MANIFEST]


def check_prepared_pixels(cfg: Config, base: Path | None = None) -> None:
    """Images stored as a model sees them (`prepare --store-pixels`, the manifest's `pixels`) are that
    model's: at another size, aspect or pad colour, training would resize them again, off the exported
    processor's pixels. The model's size and mean are looked up only when some manifest has `pixels`."""
    from vistralv_ray.data.images import StoredPixels, pixels_for_model

    expected = None
    for key, uris in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for uri in uris:
            for manifest_uri in _data_manifests(uri, base or Path.cwd()):
                if not storage.exists(manifest_uri):
                    continue
                manifest = json.loads(storage.read_bytes(manifest_uri))
                warn_looser_prepare_limits(cfg, key, manifest_uri, manifest)
                entry = manifest.get("pixels")
                if not entry:
                    continue
                expected = expected or pixels_for_model(cfg.model)
                stored = StoredPixels.from_manifest(entry)
                differences = stored.differences(expected)
                if not differences:
                    continue
                name = differences[0]
                recipe_key = PIXELS_RECIPE_KEY[name]
                if name == "size" and not cfg.model.image_size:
                    recipe_key += " (unset: the vision tower's image_size)"
                raise ConfigError(
                    f"{key}: {manifest_uri} says its images are stored at pixels.{name} = "
                    f"{getattr(stored, name)}, but {recipe_key} gives {getattr(expected, name)} "
                    "for this recipe; prepare the data again with this recipe (`vistralv-ray prepare "
                    "--store-pixels --config <recipe>`), or train on shards of the original images"
                )


# Input limits `prepare` records in the manifest, which training applies again (data.<same name>).
_PREPARE_LIMITS = ("max_image_pixels", "max_message_chars", "max_record_chars")


def warn_looser_prepare_limits(cfg: Config, key: str, manifest_uri: str, manifest: dict) -> None:
    """Shards prepared under looser limits than this run's hold records training will reject (counted,
    as too_many_pixels / text_too_long): the epoch is shorter than the manifest's count. Say so first."""
    for name in _PREPARE_LIMITS:
        prepared, here = manifest.get(name), getattr(cfg.data, name)
        if isinstance(prepared, int) and prepared > here:
            log.warning(
                "%s: %s was prepared with %s = %d, above this run's data.%s = %d: records prepare accepted "
                "will be rejected in training; --set data.%s=%d trains on all of them",
                key,
                manifest_uri,
                name,
                prepared,
                name,
                here,
                name,
                prepared,
            )


def static_checks(cfg: Config, environ: dict[str, str] | None = None, base: Path | None = None) -> None:
    """Every check that needs neither Ray nor the network."""
    check_placeholders(cfg)
    check_local_shards(cfg, base)
    check_wandb(cfg, environ)


# ---- node types -------------------------------------------------------------------------------------


def node_types_from_launcher(doc: dict) -> list[NodeType]:
    """A cluster launcher config's `available_node_types` (the head counts once)."""
    head = doc.get("head_node_type")
    return [
        NodeType(name, {k: float(v) for k, v in node.get("resources", {}).items()},
                 1 if name == head else node.get("max_workers", doc.get("max_workers")))
        for name, node in doc.get("available_node_types", {}).items()
    ]  # fmt: skip


def _quantity(value) -> float:
    """A Kubernetes quantity of CPUs or GPUs ("8", "500m", 8) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _kuberay_group(name: str, group: dict, count: int | None) -> NodeType:
    params = group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    resources: dict[str, float] = {}
    cpus = params.get("num-cpus", limits.get("cpu"))
    if cpus is not None:
        resources["CPU"] = _quantity(cpus)
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu"))
    if gpus is not None and _quantity(gpus) > 0:
        resources["GPU"] = _quantity(gpus)
    if "resources" in params:
        # KubeRay hands the value to `ray start --resources` as it is: a JSON object, often quoted again.
        custom = json.loads(params["resources"])
        custom = json.loads(custom) if isinstance(custom, str) else custom
        resources.update({k: float(v) for k, v in custom.items()})
    return NodeType(name, resources, count)


def node_types_from_kuberay(doc: dict) -> list[NodeType]:
    """The head and worker groups of a RayJob or RayCluster manifest."""
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    types = [_kuberay_group("head", spec["headGroupSpec"], 1)]
    for group in spec.get("workerGroupSpecs", []):
        count = group.get("maxReplicas", group.get("replicas"))
        types.append(_kuberay_group(group["groupName"], group, count))
    return types


def load_node_types(path: str | Path) -> list[NodeType]:
    """Node types of a cluster launcher YAML or a KubeRay RayJob / RayCluster manifest."""
    doc = yaml.safe_load(Path(path).read_text())
    if isinstance(doc, dict) and "available_node_types" in doc:
        return node_types_from_launcher(doc)
    if isinstance(doc, dict) and doc.get("kind") in ("RayJob", "RayCluster"):
        return node_types_from_kuberay(doc)
    raise ConfigError(f"{path}: neither a cluster launcher config nor a KubeRay RayJob/RayCluster manifest")


def bootstrap_node_types(path: Path = BOOTSTRAP_CONFIG) -> list[NodeType] | None:
    """The node types of the launcher cluster this process runs on, or None when there is no such file."""
    path = path.expanduser()
    return node_types_from_launcher(yaml.safe_load(path.read_text())) if path.is_file() else None


# ---- resources ----------------------------------------------------------------------------------------


def worker_bundle(cfg: Config, use_gpu: bool) -> dict[str, float]:
    """What one Ray Train worker asks for (as `driver.build_trainer` builds it)."""
    bundle = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    if use_gpu:
        bundle["GPU"] = 1.0
    return bundle


def preprocess_bundle(cfg: Config) -> dict[str, float]:
    """What one Ray Data preprocessing actor asks for."""
    return {"CPU": cfg.data.preprocess_cpus_per_actor, **cfg.data.preprocess_resources}


def _fits(bundle: dict[str, float], offer: dict[str, float]) -> bool:
    return all(offer.get(k, 0.0) >= v for k, v in bundle.items() if v > 0)


def check_resources_fit(cfg: Config, node_types: list[NodeType], use_gpu: bool, where: str = "the cluster") -> None:
    """Every train worker and preprocessing actor fits some node type, and the GPU workers fit in all."""
    offers = ", ".join(f"{t.name} {t.resources}" for t in node_types)
    worker = worker_bundle(cfg, use_gpu)
    if not any(_fits(worker, t.resources) for t in node_types):
        key = "scaling.resources_per_worker" if cfg.scaling.resources_per_worker else "scaling.cpus_per_worker"
        raise ConfigError(
            f"{key}: a train worker asks for {worker}, which no node type of {where} offers ({offers}); "
            "lower it or add a node type that has it"
        )
    actor = preprocess_bundle(cfg)
    if not any(_fits(actor, t.resources) for t in node_types):
        key = "data.preprocess_resources" if cfg.data.preprocess_resources else "data.preprocess_cpus_per_actor"
        raise ConfigError(
            f"{key}: a preprocessing actor asks for {actor}, which no node type of {where} offers ({offers})"
        )
    if use_gpu and all(t.max_count is not None for t in node_types):
        most = sum(int(t.resources.get("GPU", 0)) * t.max_count for t in node_types)
        if cfg.scaling.workers > most:
            raise ConfigError(
                f"scaling.workers: {cfg.scaling.workers} GPU workers, but {where} can hold at most {most} GPUs "
                "(node types x their max count); lower scaling.workers or raise the GPU nodes' max count"
            )


def resolve_gpu_from_node_types(cfg: Config, node_types: list[NodeType] | None, live_gpus: float, local: bool) -> bool:
    """`scaling.use_gpu` for a run on a cluster. `auto` looks at what the cluster can have, not only what is
    up: an autoscaling cluster starts at zero GPU nodes, and `auto` would otherwise train on CPUs."""
    if cfg.scaling.use_gpu != "auto":
        return bool(cfg.scaling.use_gpu)
    if node_types is not None:
        return any(t.resources.get("GPU", 0) > 0 for t in node_types)
    if live_gpus > 0:
        return True
    if local:
        return False  # a head on this machine: no autoscaler adds GPU nodes later
    raise ConfigError(
        "scaling.use_gpu: auto cannot tell whether this cluster will have GPUs (none is up yet, and its node "
        "types cannot be read): set it explicitly, --set scaling.use_gpu=true (or false), or name the cluster's "
        "config (jobs/submit.py --cluster-config cluster/aws-a100.yaml)"
    )


# Resources every Ray node has; anything else in a bundle is a custom resource some nodes advertise.
_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


def unoffered_resources(cfg: Config, live: list[NodeType]) -> list[str]:
    """The custom resources the recipe places its workers and actors by that no live node offers."""
    wanted = [("scaling.resources_per_worker", k) for k in cfg.scaling.resources_per_worker]
    wanted += [("data.preprocess_resources", k) for k in cfg.data.preprocess_resources]
    return [
        f"{key}: {name!r}"
        for key, name in wanted
        if name not in _BUILTIN_RESOURCES
        and not name.startswith("accelerator_type:")
        and not any(n.resources.get(name, 0) > 0 for n in live)
    ]


def warn_unoffered_resources(cfg: Config, live: list[NodeType], address: str) -> None:
    """A cluster whose node types cannot be read (KubeRay, `ray start`, `ray://`): a custom resource no
    live node offers may come with a node an autoscaler adds, or never, when nothing adds nodes and the
    run would wait for it forever. Which of the two cannot be told from here: say it loudly, first."""
    missing = unoffered_resources(cfg, live)
    if missing:
        log.warning(
            "no node of the cluster at %s offers %s: the run waits until an autoscaler adds such a node. "
            "On a cluster that adds none (ray start, a fixed KubeRay group) it would wait forever: start "
            "the nodes with these resources (ray start --resources '{\"trainer\": 8}'; cluster/README.md), "
            "or place by CPUs/GPUs alone: --set scaling.resources_per_worker={} --set data.preprocess_resources={}",
            address,
            "; ".join(missing),
        )


# ---- the driver's hook -------------------------------------------------------------------------------


def _live_nodes() -> list[NodeType]:
    import ray

    return [
        NodeType(n["NodeID"][:8], {k: float(v) for k, v in n["Resources"].items()}, 1)
        for n in ray.nodes()
        if n.get("Alive")
    ]


def run_preflight(cfg: Config) -> Config:
    """Fail fast on what would fail later; returns the config with `scaling.use_gpu` resolved on a cluster.

    On a cluster (RAY_ADDRESS) the caller has joined it already (`driver.ensure_ray`): the live nodes
    tell the GPUs that are up; the launcher's bootstrap config on the head tells the node types the
    autoscaler may add.
    """
    from vistralv_ray.ray_runtime import cluster_address

    static_checks(cfg)
    check_prepared_pixels(cfg)  # reads manifests on s3:// too: not a static check
    address = cluster_address()
    if not address:
        return cfg  # an embedded Ray, sized for this run by ensure_ray
    host = urlparse(address if "://" in address else f"ray://{address}").hostname
    local = host in LOOPBACK_HOSTS
    node_types = bootstrap_node_types()
    live = _live_nodes()
    use_gpu = resolve_gpu_from_node_types(cfg, node_types, sum(t.resources.get("GPU", 0) for t in live), local)
    if node_types is not None:
        check_resources_fit(cfg, node_types, use_gpu, where=f"the launcher config {BOOTSTRAP_CONFIG}")
    elif local and live:
        check_resources_fit(cfg, live, use_gpu, where=f"the cluster at {address}")
    else:
        warn_unoffered_resources(cfg, live, address)
    if cfg.scaling.use_gpu == "auto":
        log.info("scaling.use_gpu: auto resolved to %s for this cluster", use_gpu)
    return dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, use_gpu=use_gpu))
