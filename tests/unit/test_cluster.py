"""The cluster shapes and the submit glue, offline: Ray's own launcher schema, the RayJob manifest, and
`jobs/submit.py --dry-run` (entrypoint, runtime_env, credentials by name only)."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from vistralv_ray.cli.main import build_parser
from vistralv_ray.config import load_config
from vistralv_ray.training.driver import WORKER_ENV

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "cluster" / "aws-a100.yaml"
RAYJOB = REPO / "cluster" / "kuberay-rayjob.yaml"

# vCPUs and GPUs of the EC2 instance types the launcher config may use.
INSTANCE_SHAPES = {
    "p4d.24xlarge": (96, 8),
    "p4de.24xlarge": (96, 8),
    "c6i.16xlarge": (64, 0),
    "m6i.4xlarge": (16, 0),
}
# RayJobSpec fields of KubeRay's ray.io/v1 API (ray-operator/apis/ray/v1/rayjob_types.go).
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}  # fmt: skip


@pytest.fixture(scope="module")
def submit():
    spec = importlib.util.spec_from_file_location("vistralv_submit", REPO / "jobs" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def rayjob_command(rayjob: dict) -> argparse.Namespace:
    """The `vistralv-ray ...` part of the entrypoint, parsed by the real command-line parser."""
    tokens = shlex.split(rayjob["spec"]["entrypoint"].split("&&")[-1])
    assert tokens[0] == "vistralv-ray"
    return build_parser().parse_args(tokens[1:])


def worker_groups(rayjob: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}


def container_limits(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


# ---- Ray cluster launcher -------------------------------------------------------------------------


def test_launcher_config_validates_against_rays_schema(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))
    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["ray.worker.cpu"]["resources"]["cpu_node"] = 0.5  # must be an integer
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_launcher_node_resources_match_their_instances(launcher):
    node_types = launcher["available_node_types"]
    assert launcher["head_node_type"] in node_types
    gpu_types = []
    for name, node in node_types.items():
        vcpus, gpus = INSTANCE_SHAPES[node["node_config"]["InstanceType"]]
        assert node["resources"].get("GPU", 0) == gpus, name
        assert node["resources"]["CPU"] == (0 if name == launcher["head_node_type"] else vcpus), name
        if gpus:
            gpu_types.append(name)
            assert node["docker"]["worker_image"].endswith("-gpu"), name
    assert gpu_types, "no GPU worker type"
    assert (
        sum(node_types[n]["max_workers"] for n in node_types if n != launcher["head_node_type"])
        <= launcher["max_workers"]
    )


def test_launcher_pins_the_installed_ray(launcher):
    images = [launcher["docker"]["image"]] + [
        n["docker"]["worker_image"] for n in launcher["available_node_types"].values() if "docker" in n
    ]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), image
    assert any(f"=={ray.__version__}" in c for c in launcher["setup_commands"])
    assert launcher["file_mounts"]["~/vistralv-ray"] == "."


def test_cpu_nodes_carry_the_resource_the_recipes_ask_for(launcher, rayjob):
    args = rayjob_command(rayjob)
    wanted = load_config(REPO / args.config, args.overrides).data.preprocess_resources
    assert wanted, "the RayJob recipe should pin preprocessing to CPU nodes"
    for name, node in launcher["available_node_types"].items():
        has = all(node["resources"].get(k, 0) >= v for k, v in wanted.items())
        assert has == (name == "ray.worker.cpu"), name


# ---- KubeRay RayJob -------------------------------------------------------------------------------


def test_rayjob_has_the_required_fields(rayjob):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"]
    for group in cluster["workerGroupSpecs"]:
        assert {"groupName", "rayStartParams", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for container in [head["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]
    ]:
        assert container["image"].startswith(f"rayproject/ray:{ray.__version__}-"), container["image"]


def test_rayjob_groups_gpu_and_cpu(rayjob):
    groups = worker_groups(rayjob)
    gpu = [g for g in groups.values() if "nvidia.com/gpu" in container_limits(g)]
    assert len(gpu) == 1 and container_limits(gpu[0])["nvidia.com/gpu"] == 8
    assert gpu[0]["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    cpu = groups["cpu-preprocess"]
    assert "nvidia.com/gpu" not in container_limits(cpu)
    # KubeRay passes the value to `ray start --resources`: a JSON object inside quotes.
    resources = json.loads(json.loads(cpu["rayStartParams"]["resources"]))
    assert resources == {"cpu_node": 1}


def test_rayjob_entrypoint_recipe_loads_and_fills_the_gpus(rayjob):
    args = rayjob_command(rayjob)
    assert args.command == "train"
    recipe = REPO / args.config
    assert recipe.is_file()
    cfg = load_config(recipe, args.overrides)
    gpu = next(g for g in worker_groups(rayjob).values() if "nvidia.com/gpu" in container_limits(g))
    assert cfg.scaling.workers == gpu["replicas"] * container_limits(gpu)["nvidia.com/gpu"]
    cpu_resources = json.loads(json.loads(worker_groups(rayjob)["cpu-preprocess"]["rayStartParams"]["resources"]))
    assert set(cfg.data.preprocess_resources) <= set(cpu_resources)


def test_rayjob_runtime_env_installs_the_package_deps(rayjob):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"].startswith("https://") and runtime_env["working_dir"].endswith(".zip")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(runtime_env["pip"]) == sorted(d for d in deps if not d.startswith("ray"))


# ---- jobs/submit.py -------------------------------------------------------------------------------


@pytest.fixture()
def clean_env(monkeypatch, submit):
    for name in list(os.environ):
        if name.startswith(("AWS_", "WANDB_", "HF_", "RAY_")):
            monkeypatch.delenv(name)
    monkeypatch.setattr(submit, "connect", lambda address: pytest.fail("contacted a cluster"))
    return monkeypatch


def test_dry_run_prints_the_job_without_secret_values(submit, clean_env, capsys):
    secrets = {"WANDB_API_KEY": "wandb-s3cret", "AWS_SECRET_ACCESS_KEY": "aws-s3cret", "HF_TOKEN": "hf-s3cret"}
    for name, value in {**secrets, "AWS_REGION": "us-west-2", "AWS_PROFILE": "laptop"}.items():
        clean_env.setenv(name, value)
    rc = submit.main(["jobs/finetune.yaml", "--address", "http://10.0.0.1:8265", "--set", "scaling.workers=16",
                      "--set", "run.storage=s3://b/runs", "--dry-run"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    job = json.loads(out)
    assert (
        job["entrypoint"]
        == "vistralv-ray train jobs/finetune.yaml --set scaling.workers=16 --set run.storage=s3://b/runs"
    )
    assert job["submission_id"].startswith("vistral-v-finetune-")
    env = job["runtime_env"]
    assert env["working_dir"] == str(REPO)
    assert {".venv/", ".git/", "runs/"} <= set(env["excludes"])
    assert sorted(env["env_vars"]) == ["AWS_REGION", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "WANDB_API_KEY"]
    for value in [*secrets.values(), "us-west-2"]:
        assert value not in out + err
    assert job["metadata"]["recipe"] == "jobs/finetune.yaml"
    assert "warning" not in err  # s3 storage and data: nothing local on a remote cluster


def test_bad_override_fails_before_submission(submit, clean_env, capsys):
    rc = submit.main(["jobs/finetune.yaml", "--address", "http://127.0.0.1:9", "--set", "scaling.workerz=16"])
    assert rc == 2
    assert "scaling.workerz" in capsys.readouterr().err


def test_recipe_outside_the_repository_is_refused(submit, clean_env, capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "jobs" / "align.yaml").read_text())
    assert submit.main([str(recipe), "--dry-run"]) == 2
    assert "working_dir" in capsys.readouterr().err


def test_file_overrides_are_inlined(submit, clean_env, capsys, tmp_path):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"base_lr": 3e-4}))
    assert submit.main(["jobs/align.yaml", "--set", f"train.base_lr=@{best}", "--dry-run"]) == 0
    entrypoint = json.loads(capsys.readouterr().out)["entrypoint"]
    assert entrypoint == "vistralv-ray train jobs/align.yaml --set train.base_lr=0.0003"
    _, args = entrypoint.split(" ", 1)
    assert load_config(REPO / "jobs/align.yaml", build_parser().parse_args(shlex.split(args)).overrides)


def test_forwarded_env_never_collides_with_the_drivers_runtime_env(submit, clean_env, capsys):
    environ = {name: "x" for name in [*WORKER_ENV, "DS_ACCELERATOR", "WANDB_API_KEY", "AWS_PROFILE", "AWS_REGION"]}
    assert sorted(submit.forwarded_env(environ, extra=[])) == ["AWS_REGION", "WANDB_API_KEY"]
    assert sorted(submit.forwarded_env(environ, extra=[], include_aws=False)) == ["WANDB_API_KEY"]
    assert submit.main(["jobs/align.yaml", "--env", "WANDB_SILENT", "--dry-run"]) == 2
    assert "WANDB_SILENT" in capsys.readouterr().err


def test_submission_ids_and_cluster_warnings(submit):
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert submit.submission_id_for("Align seed42/v2", now) == "align-seed42-v2-20260102-030405"
    cfg = load_config(REPO / "jobs/local_tiny.yaml")
    assert submit.cluster_warnings(cfg, "http://127.0.0.1:8265") == []
    warnings = submit.cluster_warnings(cfg, "http://10.0.0.1:8265")
    assert any("run.storage" in w for w in warnings) and any("data paths" in w for w in warnings)


def test_submit_retries_while_the_head_starts(submit):
    class Client:
        def __init__(self, errors: list[Exception]):
            self.errors, self.calls = errors, 0

        def submit_job(self, **kwargs):
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)
            return kwargs["submission_id"]

    job = submit.Submission(submission_id="x-1", entrypoint="true", runtime_env={})
    starting = Client([RuntimeError("Request failed with status code 500: No available agent to submit job")] * 2)
    assert submit.submit_job(starting, job, wait_s=0) == "x-1" and starting.calls == 3
    # The reply was lost but the job was created: the retry finds it.
    dropped = Client([ConnectionError("Connection aborted."), RuntimeError("Job x-1 already exists")])
    assert submit.submit_job(dropped, job, wait_s=0) == "x-1" and dropped.calls == 2
    refused = Client([RuntimeError("Request failed with status code 400: bad runtime_env")])
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        submit.submit_job(refused, job, wait_s=0)
    assert refused.calls == 1


def test_local_tiny_recipe_loads():
    cfg = load_config(REPO / "jobs" / "local_tiny.yaml")
    assert cfg.model.language_model == "assets/tiny/llm" and cfg.scaling.use_gpu is False
    assert cfg.global_batch == cfg.scaling.workers * cfg.data.per_device_batch
