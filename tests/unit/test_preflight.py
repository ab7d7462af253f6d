"""The preflight checks (vistralv_ray/training/preflight.py): each mistake fails with a message naming its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vistralv_ray.config import ConfigError, config_from_dict
from vistralv_ray.training import preflight
from vistralv_ray.training.preflight import NodeType

REPO = Path(__file__).resolve().parents[2]
AWS_NODE_TYPES = preflight.load_node_types(REPO / "cluster" / "aws-a100.yaml")


def config(*overrides: str):
    return config_from_dict({}, list(overrides))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.train=[s3://my-bucket/vistral-v/shards/align]", "data.train"),
        ("data.eval=[s3://YOUR-BUCKET/val]", "data.eval"),
        ("run.storage=s3://<bucket>/runs", "run.storage"),
    ],
)
def test_placeholder_uris_name_their_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: .* is the recipe's placeholder"):
        preflight.check_placeholders(config(override))
    preflight.check_placeholders(config("data.train=[s3://vistral-data/shards]", "run.storage=s3://vistral-data/runs"))


def test_shard_folders_need_their_manifest(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "part-00000.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"^data.train: {folder} has no manifest.json"):
        preflight.check_local_shards(config(f"data.train=[{folder}]"))
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"name": "part-00000.parquet"}]}))
    preflight.check_local_shards(config(f"data.train=[{folder}]"))
    with pytest.raises(ConfigError, match=r"^data.eval: .*missing does not exist"):
        preflight.check_local_shards(config(f"data.eval=[{tmp_path / 'missing'}]"))
    preflight.check_local_shards(config(f"data.eval=[{tmp_path / 'missing'}]"), missing_ok=True)


def test_wandb_online_needs_credentials(tmp_path):
    cfg = config("run.wandb=online")
    no_netrc = tmp_path / "netrc"
    with pytest.raises(ConfigError, match=r"^run.wandb: online needs W&B credentials"):
        preflight.check_wandb(cfg, environ={}, netrc_path=no_netrc)
    preflight.check_wandb(cfg, environ={"WANDB_API_KEY": "k"}, netrc_path=no_netrc)
    no_netrc.write_text("machine api.wandb.ai\n  login user\n  password k\n")
    preflight.check_wandb(cfg, environ={}, netrc_path=no_netrc)  # what `wandb login` writes
    preflight.check_wandb(config("run.wandb=offline"), environ={}, netrc_path=tmp_path / "none")


def test_use_gpu_auto_follows_the_node_types_not_the_nodes_up():
    auto = config("scaling.use_gpu=auto")
    # An autoscaling cluster with no GPU node up yet: its node types say GPUs will come.
    assert preflight.resolve_gpu_from_node_types(auto, AWS_NODE_TYPES, live_gpus=0, local=False) is True
    cpu_only = [NodeType("cpu", {"CPU": 8.0})]
    assert preflight.resolve_gpu_from_node_types(auto, cpu_only, live_gpus=0, local=False) is False
    assert preflight.resolve_gpu_from_node_types(auto, None, live_gpus=8, local=False) is True
    assert preflight.resolve_gpu_from_node_types(auto, None, live_gpus=0, local=True) is False
    with pytest.raises(ConfigError, match=r"^scaling.use_gpu: auto cannot tell"):
        preflight.resolve_gpu_from_node_types(auto, None, live_gpus=0, local=False)
    explicit = config("scaling.use_gpu=false")
    assert preflight.resolve_gpu_from_node_types(explicit, None, live_gpus=8, local=False) is False


def test_resources_no_node_type_offers():
    preflight.check_resources_fit(config("scaling.workers=16", "scaling.cpus_per_worker=4"), AWS_NODE_TYPES, True)
    with pytest.raises(ConfigError, match=r"^scaling.cpus_per_worker: a train worker asks for"):
        preflight.check_resources_fit(config("scaling.cpus_per_worker=128"), AWS_NODE_TYPES, True)
    with pytest.raises(ConfigError, match=r"^scaling.resources_per_worker: "):
        preflight.check_resources_fit(config("scaling.resources_per_worker={efa: 1}"), AWS_NODE_TYPES, True)
    with pytest.raises(ConfigError, match=r"^data.preprocess_resources: a preprocessing actor asks for"):
        preflight.check_resources_fit(config("data.preprocess_resources={tpu_node: 1}"), AWS_NODE_TYPES, True)
    with pytest.raises(ConfigError, match=r"^scaling.workers: 17 GPU workers, but .* at most 16 GPUs"):
        preflight.check_resources_fit(config("scaling.workers=17"), AWS_NODE_TYPES, True)
    # 8 GPUs per worker on 4-GPU nodes (asked through resources_per_worker; use_gpu would ask for one).
    four = [NodeType("g4", {"CPU": 48.0, "GPU": 4.0}, 2)]
    with pytest.raises(ConfigError, match=r"^scaling.resources_per_worker: a train worker asks for .*'GPU': 8"):
        preflight.check_resources_fit(config("scaling.resources_per_worker={GPU: 8}"), four, False)


def test_kuberay_groups_are_read_as_node_types():
    types = {t.name: t for t in preflight.load_node_types(REPO / "cluster" / "kuberay-rayjob.yaml")}
    assert types["head"].resources == {"CPU": 0.0}
    assert types["a100"].resources == {"CPU": 88.0, "GPU": 8.0, "trainer": 8.0} and types["a100"].max_count == 2
    assert types["cpu-preprocess"].resources == {"CPU": 60.0, "cpu_node": 1.0}


def test_run_preflight_without_a_cluster_keeps_the_config(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = config("scaling.use_gpu=auto")
    assert preflight.run_preflight(cfg) is cfg  # an embedded Ray: driver.resolve_use_gpu decides


def test_run_preflight_on_a_cluster_resolves_use_gpu(monkeypatch, tmp_path):
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text((REPO / "cluster" / "aws-a100.yaml").read_text())
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setattr(preflight, "BOOTSTRAP_CONFIG", bootstrap)
    monkeypatch.setattr(preflight, "_live_nodes", lambda: [NodeType("head", {"CPU": 0.0}, 1)])
    monkeypatch.setattr("vistralv_ray.training.driver.ensure_ray", lambda cfg: None)
    monkeypatch.setattr(preflight.bootstrap_node_types, "__defaults__", (bootstrap,))
    assert preflight.run_preflight(config("scaling.use_gpu=auto")).scaling.use_gpu is True
    bootstrap.unlink()
    with pytest.raises(ConfigError, match=r"^scaling.use_gpu"):
        preflight.run_preflight(config("scaling.use_gpu=auto"))


@pytest.mark.parametrize("recipe", ["align.yaml", "finetune.yaml", "local_tiny.yaml"])
def test_an_embedded_ray_advertises_the_placement_resources_the_recipe_asks_for(recipe, monkeypatch):
    """A cluster recipe pins its workers to `trainer` nodes and its preprocessing to `cpu_node` ones; run on
    one machine (no RAY_ADDRESS), the embedded Ray holds both, so every worker and actor can start."""
    import ray

    from vistralv_ray.config import load_config
    from vistralv_ray.training import driver

    cfg = load_config(REPO / "jobs" / recipe)
    started = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(driver, "init_ray", lambda **kwargs: started.update(kwargs))
    driver.ensure_ray(cfg)
    local = NodeType("local", {"CPU": started["num_cpus"], **started["resources"]}, 1)
    preflight.check_resources_fit(cfg, [local], use_gpu=False)
    # Both pools of preprocessing actors (training and eval data) at once, and every train worker.
    assert started["resources"].get("trainer", 0) >= cfg.scaling.workers * cfg.scaling.resources_per_worker.get(
        "trainer", 0
    )
    need = 2 * cfg.data.preprocess_actors * cfg.data.preprocess_resources.get("cpu_node", 0)
    assert started["resources"].get("cpu_node", 0) >= need
    assert bool(started["resources"]) == (recipe != "local_tiny.yaml")


def test_a_cluster_without_the_recipes_placement_resources_is_named_before_the_run_waits(monkeypatch, caplog):
    """A KubeRay / `ray start` cluster (node types unreadable): the custom resources of align.yaml that no
    live node offers are named, with the fix, before Ray Train waits for them."""
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.1:10001")
    monkeypatch.setattr(preflight, "bootstrap_node_types", lambda: None)
    nodes = [NodeType("head", {"CPU": 8.0}, 1), NodeType("a100", {"CPU": 96.0, "GPU": 8.0}, 1)]
    monkeypatch.setattr(preflight, "_live_nodes", lambda: nodes)
    placed = ["scaling.resources_per_worker={trainer: 1}", "data.preprocess_resources={cpu_node: 1}"]
    cfg = config_from_dict({}, ["scaling.use_gpu=true", *placed])
    preflight.run_preflight(cfg)
    assert "offers scaling.resources_per_worker: 'trainer'; data.preprocess_resources: 'cpu_node'" in caplog.text
    caplog.clear()
    nodes[1].resources["trainer"] = 8.0
    nodes[0].resources["cpu_node"] = 1.0
    preflight.run_preflight(cfg)
    assert "offers" not in caplog.text
