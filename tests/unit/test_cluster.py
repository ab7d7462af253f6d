"""The cluster shapes and the submit glue, offline: Ray's own launcher schema, the IAM policies and the
security group, the image and its lock, the RayJob against KubeRay's CRD, and `jobs/submit.py --dry-run`
(entrypoint, runtime_env, no secrets unless opted in)."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vistralv_ray.cli.main import build_parser
from vistralv_ray.config import load_config
from vistralv_ray.training.driver import WORKER_ENV

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
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


# The image's code in the RayJob's entrypoint, and the ConfigMap value its shell fills in.
IMAGE_REPO = "/home/ray/vistralv-ray/"
BUCKET_VAR = re.compile(r"\$\{VISTRALV_BUCKET[^}]*\}")
IMAGE_TAG = re.compile(r"^vistralv-ray:(?P<version>[\d.]+)-ray(?P<ray>[\d.]+)-py(?P<py>\d+)-(?P<kind>cpu|gpu)$")


def load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def submit():
    return load_script("vistralv_submit", REPO / "jobs" / "submit.py")


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def rayjob_command(rayjob: dict) -> argparse.Namespace:
    """The `vistralv-ray ...` part of the entrypoint, parsed by the real command-line parser."""
    tokens = shlex.split(BUCKET_VAR.sub("test-bucket", rayjob["spec"]["entrypoint"]))
    assert tokens[0] == "vistralv-ray"
    args = build_parser().parse_args(tokens[1:])
    assert args.config.startswith(IMAGE_REPO), args.config  # the recipe inside the image
    args.config = args.config.removeprefix(IMAGE_REPO)
    return args


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


def image_tags(launcher: dict, rayjob: dict) -> list[str]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"] + [rayjob["spec"]["submitterPodTemplate"]]
    return (
        [launcher["docker"]["image"]]
        + [n["docker"]["worker_image"] for n in launcher["available_node_types"].values() if "docker" in n]
        + [c["image"] for pod in pods for c in pod.get("template", pod)["spec"]["containers"]]
    )


def test_cluster_files_run_the_one_image_at_the_installed_ray(launcher, rayjob):
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    for image in image_tags(launcher, rayjob):
        tag = IMAGE_TAG.match(image)
        assert tag, image
        assert (tag["ray"], tag["py"]) == (ray.__version__, py), image
    gpu_nodes = [n for n in launcher["available_node_types"].values() if n["resources"].get("GPU")]
    assert all(IMAGE_TAG.match(n["docker"]["worker_image"])["kind"] == "gpu" for n in gpu_nodes)
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    # Nothing installed at node or job start: the image carries the code and the locked packages.
    commands = " ".join(
        str(c) for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands") for c in launcher.get(key, [])
    )  # fmt: skip
    assert "pip" not in commands and "pip" not in rayjob["spec"]["entrypoint"]
    assert "runtimeEnvYAML" not in rayjob["spec"]
    assert "~/vistralv-ray" not in launcher["file_mounts"]


def test_dockerfile_builds_from_rays_image_with_the_lock():
    text = (CLUSTER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["RAY_VERSION"] == ray.__version__
    assert args["PYTHON_TAG"] == f"py{sys.version_info.major}{sys.version_info.minor}"
    assert args["CUDA_TAG"].startswith("cu")
    froms = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.M)
    assert froms == [
        ("rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu", "cpu"),
        ("rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}", "gpu"),
    ]
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert all("-c cluster/requirements.lock" in line or "-r cluster/requirements.lock" in line
               or "flash-attn" in line for line in installs), installs  # fmt: skip
    assert "flash-attn==${FLASH_ATTN_VERSION}" in text.split("AS gpu")[1]
    assert "flash-attn==" not in text.split("AS gpu")[0]  # the CPU image stays light


def test_lock_pins_exactly_pyprojects_requirements_within_their_ranges():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    requirements = {
        canonicalize_name(r.name): r
        for r in map(Requirement, tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    }
    pins = {}
    for line in (CLUSTER / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    assert set(pins) == set(requirements)
    for name, version in pins.items():
        assert requirements[name].specifier.contains(version, prereleases=True), (name, version)
    assert pins["ray"] == ray.__version__
    # The lock is what `make_lock.py` writes from this environment.
    make_lock = load_script("vistralv_make_lock", CLUSTER / "make_lock.py")
    assert make_lock.main(["--check"]) == 0


def test_ray_is_pinned_to_its_minor_and_ruff_exactly():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray_req = next(Requirement(r) for r in project["dependencies"] if r.startswith("ray"))
    major, minor = map(int, ray.__version__.split(".")[:2])
    assert ray_req.specifier.contains(ray.__version__)
    assert not ray_req.specifier.contains(f"{major}.{minor + 1}.0")
    assert not ray_req.specifier.contains(f"{major}.{minor - 1}.0")
    ruff = next(Requirement(r) for r in project["optional-dependencies"]["test"] if r.startswith("ruff"))
    assert str(ruff.specifier).startswith("==")
    for text in project["dependencies"]:
        req = Requirement(text)
        if req.name in ("torch", "deepspeed", "transformers", "tokenizers", "peft", "numpy"):
            assert any(s.operator == "<" for s in req.specifier), text  # a major that would break us


# ---- IAM and network --------------------------------------------------------------------------------


def test_every_node_type_has_its_instance_profile_and_own_security_group(launcher):
    head = launcher["head_node_type"]
    for name, node in launcher["available_node_types"].items():
        config = node["node_config"]
        expected = "vistralv-ray-head" if name == head else "vistralv-ray-worker"
        assert config["IamInstanceProfile"] == {"Name": expected}, name
        # With a group named on every node type Ray never creates its default one (SSH from anywhere).
        assert config["SecurityGroupIds"], name
    assert "ray-autoscaler-v1" not in LAUNCHER.read_text()


def test_nothing_in_the_cluster_files_is_open_to_the_internet():
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".json", ".md", ".py", "") and path.name != "Dockerfile":
            text = path.read_text()
            for cidr in ("0.0.0.0/0", "::/0"):
                assert cidr not in text or path.suffix in (".md", ".py"), (path, cidr)
    readme = (CLUSTER / "README.md").read_text()
    assert "authorize-security-group-ingress" in readme and '--cidr "$SSH_CIDR"' in readme


def policy(name: str) -> dict:
    return json.loads((CLUSTER / "iam" / f"{name}.json").read_text())


def statements(doc: dict) -> list[dict]:
    for s in doc["Statement"]:
        s["Action"] = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
        s["Resource"] = [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
    return doc["Statement"]


def test_iam_policies_scope_passrole_and_the_bucket():
    trust = policy("ec2-trust")
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    bucket = {"arn:aws:s3:::RUN_BUCKET", "arn:aws:s3:::RUN_BUCKET/*"}
    for name in ("head-policy", "worker-policy"):
        for s in statements(policy(name)):
            assert s["Effect"] == "Allow" and "*" not in s["Action"], (name, s)
            assert not any(a in ("s3:*", "ec2:*", "iam:*") for a in s["Action"]), (name, s)
            if any(a.startswith("s3:") for a in s["Action"]):
                assert set(s["Resource"]) <= bucket, (name, s)
    head = statements(policy("head-policy"))
    (passrole,) = [s for s in head if "iam:PassRole" in s["Action"]]
    assert passrole["Action"] == ["iam:PassRole"]
    assert passrole["Resource"] == ["arn:aws:iam::*:role/vistralv-ray-worker"]
    assert passrole["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    stop = next(s for s in head if "ec2:TerminateInstances" in s["Action"])
    assert (
        stop["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"]
        == yaml.safe_load(LAUNCHER.read_text())["cluster_name"]
    )
    worker_services = {a.split(":")[0] for s in statements(policy("worker-policy")) for a in s["Action"]}
    assert worker_services == {"s3", "ecr"}  # the bucket and the image: nothing else for image decoders


def test_render_launcher_fills_the_account_and_refuses_bad_values(launcher):
    render = load_script("vistralv_render", CLUSTER / "render_launcher.py")
    out = render.render(launcher, "sg-0123456789abcdef0", "123456789012.dkr.ecr.us-west-2.amazonaws.com", "pg-a100")
    render.validate(out)
    for name, node in out["available_node_types"].items():
        assert node["node_config"]["SecurityGroupIds"] == ["sg-0123456789abcdef0"]
        assert ("Placement" in node["node_config"]) == bool(node["resources"].get("GPU")), name
    assert out["docker"]["image"].startswith("123456789012.dkr.ecr.us-west-2.amazonaws.com/vistralv-ray:")
    assert "docker login" in out["initialization_commands"][0]
    with pytest.raises(ValueError, match="security-group"):
        render.render(launcher, "0.0.0.0/0")
    opened = copy.deepcopy(launcher)
    opened["provider"]["security_group"] = {"IpPermissions": [{"IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
    with pytest.raises(ValueError, match="whole internet"):
        render.render(opened, "sg-0123456789abcdef0")


def test_cpu_nodes_carry_the_resource_the_recipes_ask_for(launcher, rayjob):
    args = rayjob_command(rayjob)
    wanted = load_config(REPO / args.config, args.overrides).data.preprocess_resources
    assert wanted, "the RayJob recipe should pin preprocessing to CPU nodes"
    for name, node in launcher["available_node_types"].items():
        has = all(node["resources"].get(k, 0) >= v for k, v in wanted.items())
        assert has == (name == "ray.worker.cpu"), name


def cluster_node_types() -> dict[str, tuple[list, str]]:
    """(node types, the head's name) of every cluster file: the launcher template and each KubeRay
    RayJob / RayCluster."""
    from vistralv_ray.training.preflight import node_types_from_kuberay, node_types_from_launcher

    launcher = yaml.safe_load(LAUNCHER.read_text())
    shapes = {LAUNCHER.name: (node_types_from_launcher(launcher), launcher["head_node_type"])}
    for path in sorted(CLUSTER.glob("kuberay-*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and doc.get("kind") in ("RayJob", "RayCluster"):
                shapes[f"{path.name}#{i}"] = (node_types_from_kuberay(doc), "head")
    return shapes


def test_the_resources_recipes_name_are_on_the_node_kinds_of_every_cluster_file():
    """Train workers fit the GPU node types only, preprocessing actors the CPU worker types only (not
    the head), in every cluster file, for every recipe that names placement resources."""
    from vistralv_ray.training.preflight import preprocess_bundle, worker_bundle

    def fits(bundle: dict, offer: dict) -> bool:
        return all(offer.get(k, 0.0) >= v for k, v in bundle.items() if v > 0)

    pinned = []
    for recipe in sorted((REPO / "jobs").glob("*.yaml")):
        cfg = load_config(recipe)
        if not (cfg.scaling.resources_per_worker or cfg.data.preprocess_resources):
            continue  # a local recipe: runs wherever there is room
        pinned.append(recipe.name)
        for where, (types, head) in cluster_node_types().items():
            workers = {t.name for t in types if fits(worker_bundle(cfg, use_gpu=True), t.resources)}
            actors = {t.name for t in types if fits(preprocess_bundle(cfg), t.resources)}
            gpu = {t.name for t in types if t.resources.get("GPU", 0) > 0}
            cpu = {t.name for t in types if not t.resources.get("GPU", 0) and t.name != head}
            assert workers == gpu and gpu, f"{recipe.name} on {where}: train workers fit {workers}, GPU types {gpu}"
            assert actors == cpu and cpu, f"{recipe.name} on {where}: preprocessing fits {actors}, CPU types {cpu}"
    assert {"align.yaml", "finetune.yaml"} <= set(pinned)


# ---- KubeRay RayJob -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests():
    return load_script("vistralv_validate_manifests", CLUSTER / "validate_manifests.py")


def test_every_kuberay_manifest_is_valid_against_the_vendored_crd(manifests):
    assert manifests.CRDS["RayJob"].is_file()
    files = sorted(CLUSTER.glob("kuberay-*.yaml"))
    assert files
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert manifests.errors(doc) == [], path
    assert manifests.main([str(p) for p in files]) == 0


def test_the_validator_catches_planted_nested_mistakes(manifests, rayjob):
    def planted(change) -> list[str]:
        doc = copy.deepcopy(rayjob)
        change(doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0])
        return manifests.errors(doc)

    # A misspelt key deep in a pod template: kubectl would drop it silently.
    container = lambda g: g["template"]["spec"]["containers"][0]  # noqa: E731
    errors = planted(lambda g: container(g)["resources"].update(limit={"cpu": "1"}))
    assert len(errors) == 1 and "workerGroupSpecs.0.template.spec.containers.0.resources" in errors[0]
    assert "'limit' was unexpected" in errors[0]
    assert "is not of type 'integer'" in planted(lambda g: g.update(replicas="2"))[0]
    assert planted(lambda g: container(g)["resources"]["limits"].update(cpu="88")) == []  # int-or-string
    assert "is not one of" in manifests.errors({**rayjob, "spec": {**rayjob["spec"],
        "rayClusterSpec": {**rayjob["spec"]["rayClusterSpec"], "authOptions": {"mode": "tokens"}}}})[0]  # fmt: skip


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


def test_rayjob_runs_as_written(rayjob):
    spec = rayjob["spec"]
    assert 3600 <= spec["activeDeadlineSeconds"] <= 7 * 86400
    assert spec["submitterConfig"]["backoffLimit"] >= 1 and spec["backoffLimit"] == 0
    assert spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] > 0
    # KubeRay's own /dev/shm (sized to the memory limit), not a smaller volume of ours.
    cluster = spec["rayClusterSpec"]
    for pod in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        assert "volumes" not in pod["template"]["spec"]
        assert all("volumeMounts" not in c for c in pod["template"]["spec"]["containers"])
    # No placeholders: the bucket comes from a ConfigMap, in the submitter (whose shell expands the
    # entrypoint) and on every Ray pod.
    from vistralv_ray.training.preflight import placeholder_in

    args = rayjob_command(rayjob)
    cfg = load_config(REPO / args.config, args.overrides)
    for uri in [*cfg.data.train, *cfg.data.eval, cfg.run.storage]:
        assert uri.startswith("s3://test-bucket/") and not placeholder_in(uri), uri
    submitter_env = spec["submitterPodTemplate"]["spec"]["containers"][0]["env"]
    assert any(e["name"] == "VISTRALV_BUCKET" and "configMapKeyRef" in e["valueFrom"] for e in submitter_env)
    assert "YOUR" not in spec["entrypoint"] and "my-bucket" not in spec["entrypoint"]


def test_rayjob_cpu_group_holds_the_preprocessing_actors(rayjob):
    cfg = load_config(REPO / rayjob_command(rayjob).config, rayjob_command(rayjob).overrides)
    cpu = worker_groups(rayjob)["cpu-preprocess"]
    cpus = int(container_limits(cpu)["cpu"]) * cpu["replicas"]
    assert cfg.data.preprocess_actors * cfg.data.preprocess_cpus_per_actor <= cpus


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


# ---- jobs/submit.py -------------------------------------------------------------------------------


@pytest.fixture()
def clean_env(monkeypatch, submit):
    for name in list(os.environ):
        if name.startswith(("AWS_", "WANDB_", "HF_", "RAY_")):
            monkeypatch.delenv(name)
    monkeypatch.setattr(submit, "connect", lambda address: pytest.fail("contacted a cluster"))
    return monkeypatch


FINETUNE_ON_S3 = [
    "--set",
    "data.train=[s3://b/shards]",
    "--set",
    "data.eval=[s3://b/val]",
    "--set",
    "run.storage=s3://b/runs",
]


def test_dry_run_forwards_no_secrets_by_default(submit, clean_env, capsys):
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID", "AWS_SECRET_ACCESS_KEY": "aws-s3cret",
               "AWS_SESSION_TOKEN": "aws-s3ssion", "WANDB_API_KEY": "wandb-s3cret",
               "HF_TOKEN": "hf-s3cret", "RAY_AUTH_TOKEN": "ray-auth-s3cret"}  # fmt: skip
    for name, value in {**secrets, "AWS_REGION": "us-west-2", "AWS_PROFILE": "laptop"}.items():
        clean_env.setenv(name, value)
    rc = submit.main(["jobs/finetune.yaml", "--address", "http://10.0.0.1:8265", "--set", "scaling.workers=16",
                      "--set", "scaling.use_gpu=true", *FINETUNE_ON_S3, "--dry-run"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    job = json.loads(out)
    assert job["entrypoint"] == (
        "vistralv-ray train jobs/finetune.yaml --set scaling.workers=16 --set scaling.use_gpu=true "
        "--set 'data.train=[s3://b/shards]' --set 'data.eval=[s3://b/val]' --set run.storage=s3://b/runs"
    )
    assert job["submission_id"].startswith("vistral-v-finetune-")
    env = job["runtime_env"]
    assert env["working_dir"] == str(REPO)
    assert {".venv/", ".git/", "runs/"} <= set(env["excludes"])
    assert env["env_vars"] == {"AWS_REGION": "<redacted>"}  # a setting, not a secret
    for text in [*secrets, *secrets.values(), "laptop"]:
        assert text not in out, text  # neither the values nor the names
    assert job["metadata"]["recipe"] == "jobs/finetune.yaml"
    # The recipe wants W&B online: the key stays here, and the user is told how the job gets one.
    assert "WANDB_API_KEY is not forwarded" in err and "wandb-s3cret" not in err


def test_forwarding_a_secret_is_an_opt_in_with_a_warning(submit, clean_env, capsys):
    clean_env.setenv("WANDB_API_KEY", "wandb-s3cret")
    rc = submit.main(["jobs/finetune.yaml", "--address", "http://10.0.0.1:8265", "--set", "scaling.use_gpu=true",
                      *FINETUNE_ON_S3, "--env", "WANDB_API_KEY", "--env", "HF_TOKEN", "--dry-run"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["runtime_env"]["env_vars"] == {"WANDB_API_KEY": "<redacted>"}
    assert "--env WANDB_API_KEY: its value goes into the job's runtime_env" in err
    assert "--env HF_TOKEN: not set" in err
    assert "wandb-s3cret" not in out + err and "WANDB_API_KEY is not forwarded" not in err


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
    assert submit.main(["jobs/align.yaml", "--command", "plan", "--set", f"train.base_lr=@{best}", "--dry-run"]) == 0
    entrypoint = json.loads(capsys.readouterr().out)["entrypoint"]
    assert entrypoint == "vistralv-ray plan jobs/align.yaml --set train.base_lr=0.0003"
    _, args = entrypoint.split(" ", 1)
    assert load_config(REPO / "jobs/align.yaml", build_parser().parse_args(shlex.split(args)).overrides)


def test_forwarded_env_never_collides_with_the_drivers_runtime_env(submit, clean_env, capsys):
    environ = {name: "x" for name in [*WORKER_ENV, "DS_ACCELERATOR", "WANDB_API_KEY", "AWS_PROFILE", "AWS_REGION"]}
    assert sorted(submit.forwarded_env(environ, extra=[])) == ["AWS_REGION"]
    assert sorted(submit.forwarded_env(environ, extra=["WANDB_API_KEY"])) == ["AWS_REGION", "WANDB_API_KEY"]
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


# ---- jobs/submit.py: preflight, ignored assets, stop and logs -------------------------------------


def test_submit_refuses_the_recipes_placeholders(submit, clean_env, capsys):
    rc = submit.main(["jobs/finetune.yaml", "--set", "scaling.use_gpu=true", "--dry-run"])
    assert rc == 2
    assert "data.train: s3://my-bucket/" in capsys.readouterr().err


def test_submit_resolves_use_gpu_from_the_cluster_config_or_asks_for_it(submit, clean_env, capsys):
    base = ["jobs/finetune.yaml", "--address", "http://10.0.0.1:8265", *FINETUNE_ON_S3, "--dry-run"]
    assert submit.main(base) == 2
    assert "scaling.use_gpu: auto cannot tell" in capsys.readouterr().err
    assert submit.main([*base, "--cluster-config", "cluster/aws-a100.yaml"]) == 0
    assert json.loads(capsys.readouterr().out)["entrypoint"].endswith("--set scaling.use_gpu=true")
    # 2 p4d nodes hold 16 GPU workers at most; the RayJob's groups are read the same way.
    assert submit.main([*base, "--cluster-config", "cluster/aws-a100.yaml", "--set", "scaling.workers=24"]) == 2
    assert "scaling.workers: 24 GPU workers" in capsys.readouterr().err
    assert submit.main([*base, "--cluster-config", "cluster/kuberay-rayjob.yaml",
                        "--set", "data.preprocess_resources={tpu_node: 1}"]) == 2  # fmt: skip
    assert "data.preprocess_resources" in capsys.readouterr().err


def test_submit_refuses_an_unfinished_shard_folder(submit, clean_env, capsys, tmp_path):
    shards = REPO / "runs" / "test-cluster-unfinished"  # inside the repository: git-ignored runs/
    shards.mkdir(parents=True, exist_ok=True)
    (shards / "part-00000.parquet").write_bytes(b"")
    try:
        rc = submit.main(["jobs/local_tiny.yaml", "--set", f"data.train=[{shards}]", "--dry-run"])
    finally:
        (shards / "part-00000.parquet").unlink()
        shards.rmdir()
    assert rc == 2
    assert f"data.train: {shards} has no manifest.json" in capsys.readouterr().err


def test_submit_warns_about_git_ignored_assets(submit, clean_env, capsys):
    assert submit.main(["jobs/local_tiny.yaml", "--dry-run"]) == 0
    err = capsys.readouterr().err
    for path in ("assets/tiny/llm", "assets/tiny/vision", "assets/shards/align"):
        assert f"warning: {path} is git-ignored" in err
    cfg = load_config(REPO / "jobs/finetune.yaml")
    assert submit.ignored_paths(cfg, submit.WORKING_DIR_EXCLUDES) == []  # hub ids and s3:// URIs
    # train.benchmark's question file and images travel (or not) like the data.
    cfg = load_config(
        REPO / "jobs/finetune.yaml",
        [
            "train.benchmark.name=openvivqa",
            "train.benchmark.data=runs/bench/dev.json",
            "train.benchmark.images=runs/img",
        ],
    )
    assert submit.ignored_paths(cfg, submit.WORKING_DIR_EXCLUDES) == ["runs/bench/dev.json", "runs/img"]


def test_stop_and_logs_use_the_job_client(submit, clean_env, capsys):
    calls = []

    class Client:
        def stop_job(self, job_id):
            calls.append(("stop", job_id))
            return True

        def get_job_logs(self, job_id):
            calls.append(("logs", job_id))
            return "step 1 loss 2.0\n"

    clean_env.setattr(submit, "connect", lambda address: Client())
    assert submit.main(["stop", "run-1", "--address", "http://10.0.0.1:8265"]) == 0
    assert submit.main(["logs", "run-1"]) == 0
    assert calls == [("stop", "run-1"), ("logs", "run-1")]
    assert "step 1 loss 2.0" in capsys.readouterr().out


def test_entrypoint_resources_reach_the_job_client_and_must_fit_a_node_type(submit, clean_env, capsys):
    base = ["jobs/finetune.yaml", "--address", "http://10.0.0.1:8265", "--set", "scaling.use_gpu=true", *FINETUNE_ON_S3]
    rc = submit.main([*base, "--entrypoint-num-cpus", "1", "--entrypoint-resources", "{head: 1}", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    job = json.loads(out)
    assert (job["entrypoint_num_cpus"], job["entrypoint_resources"]) == (1.0, {"head": 1.0})
    assert "entrypoint_num_gpus" not in job and "entrypoint_memory" not in job  # only what was asked for

    calls = []

    class Client:
        def submit_job(self, **kwargs):
            calls.append(kwargs)
            return kwargs["submission_id"]

        def get_address(self):
            return "http://10.0.0.1:8265"

    clean_env.setattr(submit, "connect", lambda address: Client())
    assert submit.main([*base, "--entrypoint-num-gpus", "0.5", "--entrypoint-memory", "2e9"]) == 0
    assert (calls[0]["entrypoint_num_gpus"], calls[0]["entrypoint_memory"]) == (0.5, 2_000_000_000)
    assert "entrypoint_num_cpus" not in calls[0]

    # A driver no node type can hold would leave the job PENDING: refused before submitting.
    cluster = ["--cluster-config", "cluster/aws-a100.yaml", "--dry-run"]
    assert submit.main([*base, *cluster, "--entrypoint-num-gpus", "16"]) == 2
    assert "the job would stay PENDING" in capsys.readouterr().err
    assert submit.main([*base, *cluster, "--entrypoint-num-cpus", "1"]) == 0
    capsys.readouterr()
    for bad in ("[1, 2]", "{head: many}", "{CPU: 1}"):
        assert submit.main([*base, "--entrypoint-resources", bad, "--dry-run"]) == 2
        assert "--entrypoint-resources" in capsys.readouterr().err
    assert len(calls) == 1


def test_submit_tune_sends_the_space_and_an_s3_workdir(submit, clean_env, capsys):
    base = ["jobs/align.yaml", "--address", "http://10.0.0.1:8265", "--set", "scaling.use_gpu=true",
            "--set", "run.wandb=off", *FINETUNE_ON_S3, "--dry-run"]  # fmt: skip
    tune = ["--command", "tune", "--space", "tune_spaces/base_lr_align.yaml", "--samples", "4"]
    assert submit.main([*base, *tune, "--workdir", "s3://b/sweeps/align"]) == 0
    out, err = capsys.readouterr()
    entrypoint = json.loads(out)["entrypoint"]
    assert entrypoint.startswith(
        "vistralv-ray tune jobs/align.yaml --space tune_spaces/base_lr_align.yaml --workdir s3://b/sweeps/align "
        "--samples 4 --set"
    )
    args = build_parser().parse_args(shlex.split(entrypoint)[1:])  # the job's command line parses
    assert (args.workdir, args.samples) == ("s3://b/sweeps/align", 4)
    assert "workdir" not in err
    # On a remote cluster, a local sweep directory is one the other nodes cannot write to.
    assert submit.main([*base, *tune]) == 0
    assert "--workdir (default: sweeps/<space name>) is local" in capsys.readouterr().err
    assert submit.main([*base, "--command", "tune"]) == 2
    assert "--command tune needs --space" in capsys.readouterr().err
    assert submit.main([*base, "--space", "tune_spaces/base_lr_align.yaml"]) == 2
    assert "--space: only for --command tune" in capsys.readouterr().err
