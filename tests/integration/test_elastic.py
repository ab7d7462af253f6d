"""Elastic training on a multi-node Ray cluster started on this machine (`ray.cluster_utils.Cluster`):
a CPU-only head that runs the preprocessing and the driver, and trainer nodes with a custom `trainer`
resource standing in for a GPU. The run starts on two trainer nodes; a third joins mid-epoch and the
group grows to it, then a trainer node is removed and the group shrinks back: each time the run goes on
from the last checkpoint under the elastic policy, trains every record once, and its workers and
preprocessing actors run on the nodes their resources name (each records its node from inside)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from vistralv_ray.data.placement import PLACEMENT_DIR, read_placement
from vistralv_ray.training.checkpointing import TrainerState
from vistralv_ray.training.driver import train

pytestmark = pytest.mark.integration

RECORDS = 48  # the demo align records


@pytest.fixture()
def trainer_cluster(monkeypatch):
    """Head: 3 CPUs and `cpu_node` (preprocessing, driver, Train's controller); 2 trainer nodes of 1 CPU
    (`add_trainer` adds one more)."""
    import ray
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    ray.shutdown()
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # A group that asks for a node that is gone waits this long before Ray Train decides again.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 3, "resources": {"cpu_node": 10}, "include_dashboard": False},
    )
    trainers = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    # The test adds a node from a watcher thread (train() holds the main thread), where Python refuses
    # the SIGTERM handler a new node registers; the fixture's cluster.shutdown() stops it all the same.
    monkeypatch.setattr(ray._private.utils, "set_sigterm_handler", lambda handler: None)
    from vistralv_ray.training.hooks import PAUSE_ENV

    # The tiny model's steps are too quick to hit mid-epoch otherwise: at 2 workers the group sleeps in
    # step 2 (after the step-1 checkpoint) until the grow restarts it, at 3 workers in step 3 (after the
    # step-2 checkpoint) while the test takes a node away. Not after the shrink (2 workers, step 3).
    pauses = "1:180:2,2:20:3"
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {PAUSE_ENV: pauses}})
    try:
        yield cluster, trainers
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was_up:  # the session's shared local cluster, for the tests that follow
            ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)


def after_checkpoint(
    run_dir: Path, step: int, action, events: dict, name: str, done: threading.Event
) -> threading.Thread:
    """Runs `action()` once the checkpoint of `step` is in the run directory (the group is then paused
    in the step after it); records when it is done in `events[name]`. The thread then waits for `done`: a node it
    started dies with the thread that started it (Ray starts a raylet with PR_SET_PDEATHSIG, which
    follows the forking thread, not the process)."""

    def watch():
        target = run_dir / f"checkpoint-{step:06d}"
        deadline = time.time() + 400
        while time.time() < deadline:
            if (target / "trainer_state.json").is_file():
                # Ray registers a reported checkpoint when its controller next polls the workers (every
                # 0.5 s here): before that, a restart would not resume from it. The group sleeps meanwhile.
                time.sleep(3.0)
                try:
                    action()
                except Exception as e:  # reported by the test, not lost in the thread
                    events["error"] = f"{name}: {e!r}"
                events[name] = time.time()  # the node is up (add_node waits for it) or gone
                done.wait()
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# One policy (the default): both are checked per size in tests/unit/test_elastic_plan.py, and one cluster
# run costs ~4 minutes of the CI budget; the grow and the shrink share it.
def test_trainer_nodes_joining_and_leaving_resize_the_group_on_the_trainer_nodes(trainer_cluster, run_config):
    cluster, trainers = trainer_cluster
    # keep_global_batch: 3 workers x 2 per device x 2 accumulated = 12 per step, 4 steps for the 48
    # records; at 2 workers the accumulation is 3 and the global batch and LR stay.
    cfg = run_config(
        "scaling.workers=3",
        "scaling.min_workers=2",
        "scaling.elastic_policy=keep_global_batch",
        "scaling.max_failures=3",
        "scaling.resize_interval_s=2",
        "scaling.cpus_per_worker=0.5",
        "scaling.resources_per_worker={trainer: 1}",
        "data.preprocess_resources={cpu_node: 1}",
        "data.per_device_batch=2",
        "train.grad_accum=2",
        "train.max_steps=4",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=4",
        "train.lr_rule=linear",
        "train.reference_batch=12",
        "run.name=elastic-grow-shrink",
    )
    events: dict = {}
    run_dir = Path(cfg.run.storage).expanduser() / cfg.run_name

    def add_trainer():
        trainers.append(cluster.add_node(num_cpus=1, resources={"trainer": 1}))

    done = threading.Event()
    grow = after_checkpoint(run_dir, 1, add_trainer, events, "added_at", done)
    # The joined node leaves again once the grown group has saved its step-2 checkpoint.
    shrink = after_checkpoint(
        run_dir, 2, lambda: cluster.remove_node(trainers[-1], allow_graceful=False), events, "removed_at", done
    )
    started = time.time()
    try:
        result = train(cfg)
    finally:
        done.set()
    grow.join(timeout=5)
    shrink.join(timeout=5)
    assert result.error is None, result.error
    assert "added_at" in events and "removed_at" in events and "error" not in events, events
    out = result.return_value
    history = out["history"]  # the last group's reports: after the shrink

    # Grown at the checkpoint of step 1: step 2 ran on 3 workers, accumulating 2, at the planned LR.
    by_step = {m["step"]: m for _, m in result.best_checkpoints}
    grown = by_step[2]
    assert grown["resized_from"] == 2 and grown["world_size"] == 3, grown
    assert grown["global_batch"] == 12 and grown["grad_accum"] == 2 and grown["samples_seen"] == 24
    assert grown["effective_lr"] == pytest.approx(2e-3)
    at_grow = TrainerState.load(run_dir / "checkpoint-000002")
    assert at_grow.plan["world_size"] == 3 and at_grow.epoch_samples == len(at_grow.seen_keys) == 24
    # Shrunk at the checkpoint of step 2: steps 3 and 4 on 2 workers, accumulating 3, LR unchanged.
    assert out["world_size"] == 2 and history[0]["resized_from"] == 3
    assert [m["step"] for m in history] == [3, 4]
    assert all(m["global_batch"] == 12 and m["grad_accum"] == 3 for m in history)
    assert history[0]["effective_lr"] == pytest.approx(2e-3)
    # Every record of the epoch once, and the run ended at its planned samples.
    state = TrainerState.load(Path(result.checkpoint.path))
    assert state.epoch == 0 and state.epoch_samples == RECORDS and len(state.seen_keys) == RECORDS
    assert out["samples_seen"] == state.samples_seen == RECORDS
    assert state.plan["world_size"] == 2 and state.plan["total_samples"] == RECORDS
    # The schedule (cosine, no warmup) runs over samples: its place is the samples seen, whatever the size.
    from vistralv_ray.training.optim import sample_lr_factor

    for m in [grown, *history]:
        assert m["lr"] == pytest.approx(m["effective_lr"] * sample_lr_factor(m["samples_seen"], 1, 48, 0, "cosine"))

    # Placement, as each process saw it: train workers on trainer nodes only (the 3-worker group on
    # all three, one each), preprocessing actors on the CPU head only.
    placed = read_placement(str(run_dir / PLACEMENT_DIR))
    trainer_ids = {t.node_id for t in trainers}
    workers = [p for p in placed if p["role"] == "train"]
    actors = [p for p in placed if p["role"] == "preprocess"]
    assert workers and actors, placed
    assert {p["node_id"] for p in workers} <= trainer_ids
    assert {p["node_id"] for p in actors} == {cluster.head_node.node_id}
    assert {p["node_id"] for p in workers if p["world_size"] == 3} == trainer_ids
    assert {p["world_size"] for p in workers} == {2, 3}

    for kind, at, r in (("grow", events["added_at"], grown), ("shrink", events["removed_at"], history[0])):
        timeline = {
            "detect_and_restart_s": r["resize_attempt_started_at"] - at,
            "build_s": r["resize_build_s"],
            "restore_s": r["resize_restore_s"],
            "first_step_s": r["resize_first_step_s"],
            "since_checkpoint_s": r["resize_s"],
        }
        print(f"elastic {kind} timeline: " + ", ".join(f"{k} {v:.1f}" for k, v in timeline.items()))
    print(f"elastic grow + shrink run: {time.time() - started:.1f} s")
