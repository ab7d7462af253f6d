"""Submit a recipe to a Ray cluster as a Ray job: this repository's `ray job submit`, `stop` and `logs`.

    python jobs/submit.py jobs/finetune.yaml --address http://HEAD:8265 --set scaling.workers=16 \
        [--cluster-config cluster/aws-a100.yaml] [--entrypoint-resources '{head: 1}'] [--dry-run] [--follow]
    python jobs/submit.py jobs/align.yaml --command tune --space tune_spaces/base_lr_align.yaml \
        --workdir s3://BUCKET/sweeps/align --address http://HEAD:8265 [--follow]
    python jobs/submit.py logs JOB_ID --address http://HEAD:8265 [--follow]
    python jobs/submit.py stop JOB_ID --address http://HEAD:8265

The recipe and its `--set` overrides are validated here first, then the preflight checks of a train
run (vistralv_ray/training/preflight.py: placeholder URIs, unfinished shard folders, `use_gpu: auto`
on a cluster, resources no node type offers), so a mistake fails before anything is uploaded. The
repository travels as the job's working_dir; git-ignored paths the recipe names are reported, as Ray
leaves them out of the upload. `--entrypoint-num-cpus/-gpus/-memory/-resources` reserve resources for
the job's driver (Ray's entrypoint resources), e.g. to keep it on the head with a custom resource.

Secrets stay here: a job's runtime_env is shown in full by `ray job list` and the jobs API to anyone
who can reach the cluster, so only a few non-secret settings (region, W&B entity) are forwarded by
default. Cloud credentials come from the nodes' roles (instance profile, IRSA); W&B / HF tokens from
the cluster's own secrets, or from `--env NAME`, an explicit opt-in that warns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import yaml

from vistralv_ray.config import Config, ConfigError, load_config, parse_override
from vistralv_ray.data.storage import is_s3
from vistralv_ray.training import preflight as checks
from vistralv_ray.training.driver import WORKER_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]

# Left out of the working_dir upload (gitignore syntax, on top of the repository's .gitignore).
WORKING_DIR_EXCLUDES = [
    ".git/",
    ".venv/",
    "runs/",
    "quickstart/",
    "wandb/",
    "build/",
    "*.egg-info/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
]

# Non-secret settings forwarded when set; anything else only by `--env NAME`.
FORWARDED_ENV = ("WANDB_ENTITY", "WANDB_PROJECT", "WANDB_BASE_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
# The driver sets these in its own ray.init(runtime_env=...); Ray refuses a job whose runtime_env
# sets the same keys ("Failed to merge the Job's runtime env").
RESERVED_ENV = set(WORKER_ENV) | {"DS_ACCELERATOR"}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


@dataclass
class Submission:
    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str] = field(default_factory=dict)
    # JobSubmissionClient.submit_job's entrypoint_num_cpus / _num_gpus / _memory / _resources, when set.
    entrypoint_options: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """The submission as JSON-ready data, env var values redacted."""
        env = dict(self.runtime_env)
        if "env_vars" in env:
            env["env_vars"] = {name: "<redacted>" for name in sorted(env["env_vars"])}
        return {
            "submission_id": self.submission_id,
            "entrypoint": self.entrypoint,
            "runtime_env": env,
            "metadata": self.metadata,
            **self.entrypoint_options,
        }


def forwarded_env(environ: dict[str, str], extra: list[str]) -> dict[str, str]:
    """The settings the job gets from this shell: FORWARDED_ENV, plus the names opted in with `--env`."""
    bad = sorted(set(extra) & RESERVED_ENV)
    if bad:
        raise ConfigError(f"--env {bad[0]}: the driver sets it itself; Ray would refuse the job's runtime_env")
    names = {n for n in FORWARDED_ENV if n in environ} | {n for n in extra if n in environ}
    return {n: environ[n] for n in sorted(names - RESERVED_ENV)}


def opt_in_warnings(environ: dict[str, str], extra: list[str]) -> list[str]:
    warnings = []
    for name in sorted(set(extra)):
        if name not in environ:
            warnings.append(f"--env {name}: not set in this shell; nothing forwarded")
        else:
            warnings.append(
                f"--env {name}: its value goes into the job's runtime_env, which `ray job list` and the jobs API "
                "show in full to anyone who can reach this cluster; prefer a role or a cluster secret"
            )
    return warnings


def recipe_in_repo(recipe: str | Path) -> str:
    """The recipe's path inside the repository (the job's working directory), POSIX style."""
    path = Path(recipe).resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        raise ConfigError(f"{recipe}: a submitted recipe must live in {REPO_ROOT}, the working_dir") from None


def inline_file_overrides(overrides: list[str]) -> list[str]:
    """`key=@file.json` becomes `key=<value>`: the file stays here, the job gets the value."""
    inlined = []
    for text in overrides:
        key, value = parse_override(text)
        inlined.append(f"{key}={json.dumps(value)}" if text.split("=", 1)[1].startswith("@") else text)
    return inlined


def submission_id_for(run_name: str, now: datetime | None = None) -> str:
    """`<run name>-<UTC time>`: run names are stable (a rerun resumes), submission ids must be unique."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-") or "run"
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    return f"{slug}-{stamp}"


def git_describe() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def preflight_train(cfg: Config, cluster_config: str | None) -> list[str]:
    """The driver's preflight checks, run here before anything is uploaded (ConfigError on a mistake).

    Returns the overrides that pin what this side resolved: `scaling.use_gpu: auto` from the node types
    of `--cluster-config`, since the driver may start before any GPU node is up. Without a cluster
    config, `auto` is refused: nothing here can tell whether the cluster will have GPUs.
    """
    checks.check_placeholders(cfg)
    # Paths missing here may exist on the cluster's nodes; folders here must be finished outputs.
    checks.check_local_shards(cfg, base=REPO_ROOT, missing_ok=True)
    node_types = checks.load_node_types(cluster_config) if cluster_config else None
    use_gpu = checks.resolve_gpu_from_node_types(cfg, node_types, live_gpus=0, local=False)
    if node_types is not None:
        checks.check_resources_fit(cfg, node_types, use_gpu, where=str(cluster_config))
        if cfg.scaling.use_gpu == "auto":
            return [f"scaling.use_gpu={str(use_gpu).lower()}"]
    return []


def ignored_paths(cfg: Config, excludes: list[str]) -> list[str]:
    """Relative local paths of the recipe that the working_dir upload leaves out (git-ignored or excluded)."""
    candidates = [cfg.model.language_model, cfg.model.vision_tower, *cfg.data.train, *cfg.data.eval]
    if cfg.model.init_projector_from:
        candidates.append(cfg.model.init_projector_from)
    candidates += [cfg.train.benchmark.data, cfg.train.benchmark.images]  # train.benchmark's file and images
    # Hub ids (Viet-Mistral/Vistral-7B-Chat) look relative too; no ignore rule matches them.
    relative = [c for c in dict.fromkeys(candidates) if c and "://" not in c and not c.startswith(("/", "~"))]
    if not relative:
        return []
    try:
        out = subprocess.run(
            ["git", "check-ignore", "--no-index", *relative], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        ignored = set(out.stdout.split())
    except (OSError, subprocess.TimeoutExpired):
        ignored = set()
    tops = {e.strip("/").split("/")[0] for e in excludes if "*" not in e}
    ignored |= {c for c in relative if Path(c).parts[0] in tops}
    return [c for c in relative if c in ignored]


def build_submission(args: argparse.Namespace, environ: dict[str, str]) -> tuple[Submission, Config]:
    """Validate the recipe with its overrides and assemble the job; raises ConfigError on a bad recipe."""
    overrides = inline_file_overrides(args.overrides)
    cfg = load_config(args.recipe, overrides)
    recipe = recipe_in_repo(args.recipe)
    env_vars = forwarded_env(environ, args.env)  # before the preflight: a bad --env is the first error
    entrypoint_options = entrypoint_resources(args)
    if args.command in ("train", "tune"):
        resolved = preflight_train(cfg, args.cluster_config)
        if resolved:
            overrides += resolved
            cfg = load_config(args.recipe, overrides)
        if args.cluster_config:
            check_entrypoint_fits(entrypoint_options, args.cluster_config)
    tokens = ["vistralv-ray", args.command, recipe, *tune_arguments(args)]
    for text in overrides:
        tokens += ["--set", text]
    runtime_env: dict = {"working_dir": str(REPO_ROOT), "excludes": WORKING_DIR_EXCLUDES + args.exclude}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    metadata = {"recipe": recipe, "run_name": cfg.run_name, "command": args.command}
    if (commit := git_describe()) is not None:
        metadata["git"] = commit
    submission = Submission(
        submission_id=args.submission_id or submission_id_for(cfg.run_name),
        entrypoint=shlex.join(tokens),
        runtime_env=runtime_env,
        metadata=metadata,
        entrypoint_options=entrypoint_options,
    )
    return submission, cfg


def tune_arguments(args: argparse.Namespace) -> list[str]:
    """`vistralv-ray tune`'s own arguments: the space (inside the repository) and where the sweep writes."""
    if args.command != "tune":
        given = {"--space": args.space, "--workdir": args.workdir, "--samples": args.samples}
        for flag, value in {**given, "--max-concurrent": args.max_concurrent}.items():
            if value is not None:
                raise ConfigError(f"{flag}: only for --command tune")
        return []
    if args.space is None:
        raise ConfigError("--command tune needs --space (a search space YAML in this repository, e.g. tune_spaces/)")
    tokens = ["--space", recipe_in_repo(args.space)]
    if args.workdir:
        tokens += ["--workdir", args.workdir]
    if args.samples is not None:
        tokens += ["--samples", str(args.samples)]
    if args.max_concurrent is not None:
        tokens += ["--max-concurrent", str(args.max_concurrent)]
    return tokens


def entrypoint_resources(args: argparse.Namespace) -> dict:
    """Ray's entrypoint resources for the job's driver, from the command line (nothing set: none asked for)."""
    options: dict = {}
    for name in ("num_cpus", "num_gpus", "memory"):
        value = getattr(args, f"entrypoint_{name}")
        if value is not None:
            if value < 0:
                raise ConfigError(f"--entrypoint-{name.replace('_', '-')}: {value}; allowed: >= 0")
            options[f"entrypoint_{name}"] = int(value) if name == "memory" else value
    if args.entrypoint_resources:
        try:
            resources = yaml.safe_load(args.entrypoint_resources)
        except yaml.YAMLError:
            resources = None
        if not isinstance(resources, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for k, v in resources.items()
        ):
            raise ConfigError(
                f"--entrypoint-resources: {args.entrypoint_resources!r}; expected a mapping of resource names to "
                "amounts, e.g. '{head: 1}'"
            )
        bad = sorted(set(resources) & {"CPU", "GPU", "memory"})
        if bad:
            raise ConfigError(f"--entrypoint-resources: {bad[0]} has its own flag (--entrypoint-num-cpus, ...)")
        options["entrypoint_resources"] = {k: float(v) for k, v in resources.items()}
    return options


def check_entrypoint_fits(options: dict, cluster_config: str) -> None:
    """The driver's entrypoint resources must fit some node type, or the job waits forever (PENDING)."""
    need = {"CPU": options.get("entrypoint_num_cpus", 0), "GPU": options.get("entrypoint_num_gpus", 0)}
    need.update(options.get("entrypoint_resources", {}))
    need = {k: float(v) for k, v in need.items() if v}
    if not need:
        return
    node_types = checks.load_node_types(cluster_config)
    if not any(all(t.resources.get(k, 0.0) >= v for k, v in need.items()) for t in node_types):
        offers = ", ".join(f"{t.name} {t.resources}" for t in node_types)
        raise ConfigError(
            f"--entrypoint-*: the job's driver asks for {need}, which no node type of {cluster_config} offers "
            f"({offers}); the job would stay PENDING"
        )


def cluster_warnings(cfg: Config, address: str | None, command: str = "train", workdir: str | None = None) -> list[str]:
    """Settings that work on one machine but not on a multi-node cluster."""
    host = urlparse(address if address and "://" in address else f"http://{address}").hostname
    if address is None or host in LOCAL_HOSTS:
        return []
    warnings = []
    if not is_s3(cfg.run.storage):
        warnings.append(f"run.storage={cfg.run.storage} is a local path: on a multi-node cluster use s3://")
    local_data = [u for u in cfg.data.train + cfg.data.eval if not is_s3(u)]
    if local_data:
        warnings.append(f"data paths {local_data} are local: every node must see them (use s3://)")
    if command == "tune" and not is_s3(workdir or ""):
        warnings.append(
            f"--workdir {workdir or '(default: sweeps/<space name>)'} is local: Tune's trials on other nodes "
            "cannot write there; use --workdir s3://BUCKET/sweeps/NAME"
        )
    return warnings


def connect(address: str | None):
    """The Job API client. Token auth (Ray's default) is switched on when a token is at hand."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"  # what `ray start` does when it finds a token
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def transient(error: Exception) -> bool:
    """Errors of a head that is starting or busy: no job agent yet, or a dropped HTTP connection."""
    from requests.exceptions import ConnectionError as DroppedConnection

    return isinstance(error, (ConnectionError, DroppedConnection)) or "No available agent" in str(error)


def retry(call, what: str, attempts: int, wait_s: float):
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except (RuntimeError, OSError) as e:
            if attempt == attempts or not transient(e):
                raise
            print(f"{what}: {e}; retrying in {wait_s:g} s ({attempt}/{attempts})", file=sys.stderr)
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def submit_job(client, submission: Submission, attempts: int = 12, wait_s: float = 5.0) -> str:
    """Submit, retrying while the head is starting. A retry may find the job of a dropped reply created."""
    tries = []

    def call() -> str:
        tries.append(1)
        try:
            return client.submit_job(
                entrypoint=submission.entrypoint,
                submission_id=submission.submission_id,
                runtime_env=submission.runtime_env,
                metadata=submission.metadata,
                **submission.entrypoint_options,
            )
        except RuntimeError as e:
            if len(tries) > 1 and "already exists" in str(e):
                return submission.submission_id
            raise

    return retry(call, "submit", attempts, wait_s)


def follow(client, submission_id: str, wait_s: float = 5.0) -> int:
    """Stream the job's logs until it ends; 0 when it SUCCEEDED."""
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = retry(lambda: client.get_job_status(submission_id), "job status", attempts=6, wait_s=wait_s)
    if not status.is_terminal():
        print(f"the log stream closed early; waiting for the job (logs: ray job logs {submission_id})")
    while not status.is_terminal():
        time.sleep(wait_s)
        status = retry(lambda: client.get_job_status(submission_id), "job status", attempts=6, wait_s=wait_s)
    print(f"job {submission_id}: {status.value}")
    return 0 if status.value == "SUCCEEDED" else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Submit a vistralv-ray recipe to a Ray cluster as a Ray job.")
    p.add_argument("recipe", help="recipe YAML inside this repository, e.g. jobs/finetune.yaml")
    p.add_argument(
        "--address",
        default=None,
        help="job API / dashboard address, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--command", choices=["train", "plan", "tune"], default="train", help="vistralv-ray sub-command to run"
    )
    p.add_argument("--submission-id", default=None, help="default: <run name>-<UTC time>")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="forward this env var into the job (opt-in, warns: `ray job list` shows its value to anyone)",
    )
    p.add_argument(
        "--cluster-config",
        default=None,
        metavar="YAML",
        help="the cluster's launcher config or RayJob/RayCluster manifest: resolves scaling.use_gpu=auto from its "
        "node types and checks that every worker and preprocessing actor fits one of them",
    )
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="also leave out of the upload")
    tune = p.add_argument_group("--command tune")
    tune.add_argument("--space", default=None, help="search space YAML inside this repository (tune_spaces/...)")
    tune.add_argument("--workdir", default=None, help="where the sweep writes: s3://BUCKET/sweeps/NAME on a cluster")
    tune.add_argument("--samples", type=int, default=None, help="number of samples (default: the space's)")
    tune.add_argument("--max-concurrent", type=int, default=None, help="at most this many trials at once")
    driver = p.add_argument_group("entrypoint resources (reserved for the job's driver; default: none)")
    driver.add_argument("--entrypoint-num-cpus", type=float, default=None, metavar="N")
    driver.add_argument("--entrypoint-num-gpus", type=float, default=None, metavar="N")
    driver.add_argument("--entrypoint-memory", type=float, default=None, metavar="BYTES")
    driver.add_argument(
        "--entrypoint-resources",
        default=None,
        metavar="YAML",
        help="custom resources, e.g. '{head: 1}' to keep the driver on a node that offers `head`",
    )
    p.add_argument("--dry-run", action="store_true", help="print the job as JSON; contact no cluster")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit 0 on success")
    return p


def build_job_parser(action: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"submit.py {action}", description=f"{action} a submitted job")
    p.add_argument("job_id", help="the submission id that `submit.py` printed")
    p.add_argument("--address", default=None, help="job API / dashboard address, e.g. http://HEAD:8265")
    if action == "logs":
        p.add_argument("--follow", action="store_true", help="stream until the job ends; exit 0 on success")
    return p


def job_action(action: str, argv: list[str]) -> int:
    """`stop JOB_ID` and `logs JOB_ID [--follow]`: the same client and token handling as a submission."""
    args = build_job_parser(action).parse_args(argv)
    try:
        client = connect(args.address)
        if action == "stop":
            stopped = retry(lambda: client.stop_job(args.job_id), "stop", attempts=3, wait_s=2.0)
            print(f"job {args.job_id}: {'stop requested' if stopped else 'already ended'}")
            return 0
        if args.follow:
            return follow(client, args.job_id)
        print(retry(lambda: client.get_job_logs(args.job_id), "logs", attempts=3, wait_s=2.0), end="")
        return 0
    except (RuntimeError, OSError) as e:  # unreachable head, unknown job id, ...
        print(f"error: {e}", file=sys.stderr)
        return 1


def submit_warnings(
    args: argparse.Namespace, cfg: Config, submission: Submission, environ: dict[str, str]
) -> list[str]:
    warnings = cluster_warnings(cfg, args.address, args.command, args.workdir) + opt_in_warnings(environ, args.env)
    for path in ignored_paths(cfg, WORKING_DIR_EXCLUDES + args.exclude):
        warnings.append(
            f"{path} is git-ignored (or excluded): Ray leaves it out of the working_dir upload, so the job will not "
            "find it; use an s3:// URI or a path that exists on the cluster's nodes"
        )
    if (
        args.command in ("train", "tune")
        and cfg.run.wandb == "online"
        and "WANDB_API_KEY" not in submission.runtime_env.get("env_vars", {})
    ):
        warnings.append(
            "run.wandb=online: WANDB_API_KEY is not forwarded (secrets stay here by default); the run stops at start "
            "unless the cluster provides it (a Kubernetes secret, the nodes' environment) or you pass "
            "--env WANDB_API_KEY"
        )
    return warnings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("stop", "logs"):
        return job_action(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    environ = dict(os.environ)
    try:
        submission, cfg = build_submission(args, environ)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for warning in submit_warnings(args, cfg, submission, environ):
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(json.dumps(submission.describe(), indent=2))
        return 0
    try:
        client = connect(args.address)
        job_id = submit_job(client, submission)
    except (RuntimeError, OSError) as e:  # unreachable head, refused job, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    address = client.get_address()
    forwarded = ", ".join(submission.runtime_env.get("env_vars", {})) or "none"
    print(f"submitted {job_id} to {address}")
    print(f"  entrypoint: {submission.entrypoint}")
    print(f"  forwarded env vars: {forwarded}")
    print(f"  dashboard:  {address}/#/jobs/{job_id}")
    print(f"  logs:       python jobs/submit.py logs {job_id} --address {address} --follow")
    print(f"  stop:       python jobs/submit.py stop {job_id} --address {address}")
    if not args.follow:
        return 0
    try:
        return follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (ray job stop --address {address} {job_id})")
        return 130


if __name__ == "__main__":
    sys.exit(main())
