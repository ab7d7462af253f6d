"""Elastic training on a multi-node Ray cluster started on this machine (`ray.cluster_utils.Cluster`):
a CPU-only head that runs the preprocessing and the driver, and trainer nodes with a custom `trainer`
resource standing in for a GPU. A trainer node is removed mid-epoch: the run continues with the
workers left, from the last checkpoint, under the elastic policy, and trains every record once."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from vistralv_ray.training.checkpointing import TrainerState
from vistralv_ray.training.driver import train

pytestmark = pytest.mark.integration

RECORDS = 48  # the demo align records


@pytest.fixture()
def trainer_cluster(monkeypatch):
    """Head: 2 CPUs and `cpu_node` (preprocessing, driver, Train's controller); 3 trainer nodes of 1 CPU."""
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
    trainers = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(3)]
    cluster.wait_for_nodes()
    from vistralv_ray.training.loop import PAUSE_ENV

    # The group sleeps in step 3 (after the step-2 checkpoint) while the test takes a node away: the
    # tiny model's steps are too quick to hit mid-epoch otherwise. Only at full size: not after the shrink.
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {PAUSE_ENV: "2:20"}})
    try:
        yield cluster, trainers
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was_up:  # the session's shared local cluster, for the tests that follow
            ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)


def remove_node_after_checkpoint(cluster, node, run_dir: Path, step: int, events: dict) -> threading.Thread:
    """Removes `node` once the checkpoint of `step` is in the run directory (the group is then in the
    step after it); records when."""

    def watch():
        target = run_dir / f"checkpoint-{step:06d}"
        deadline = time.time() + 300
        while time.time() < deadline:
            if (target / "trainer_state.json").is_file():
                # Ray registers a reported checkpoint when its controller next polls the workers (every
                # 0.5 s here): before that, a restart would not resume from it. The group sleeps meanwhile.
                time.sleep(3.0)
                events["removed_at"] = time.time()
                cluster.remove_node(node, allow_graceful=False)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# One policy here (the default); both are checked per size in tests/unit/test_elastic_plan.py, and one
# cluster run costs ~3 minutes of the CI budget.
@pytest.mark.parametrize("policy", ["keep_global_batch"])
def test_losing_a_trainer_node_continues_on_two_workers_under_the_policy(trainer_cluster, run_config, policy):
    cluster, trainers = trainer_cluster
    # 3 workers x 2 per device x 2 accumulated = 12 per step: 4 steps for the 48 records. On 2 workers
    # rescale_lr takes steps of 8 at 8/12 of the LR (3 more steps after step 2); keep_global_batch
    # accumulates 3 and keeps the LR (2 more steps).
    cfg = run_config(
        "scaling.workers=3",
        "scaling.min_workers=2",
        f"scaling.elastic_policy={policy}",
        "scaling.max_failures=3",
        "scaling.resize_interval_s=5",
        "scaling.cpus_per_worker=0.5",
        "scaling.resources_per_worker={trainer: 1}",
        "data.preprocess_resources={cpu_node: 1}",
        "data.per_device_batch=2",
        "train.grad_accum=2",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.lr_rule=linear",
        "train.reference_batch=12",
        f"run.name=elastic-{policy}",
    )
    events: dict = {}
    run_dir = Path(cfg.run.storage).expanduser() / cfg.run_name
    watcher = remove_node_after_checkpoint(cluster, trainers[-1], run_dir, 2, events)
    started = time.time()
    result = train(cfg)
    watcher.join(timeout=1)
    assert result.error is None, result.error
    assert "removed_at" in events, "the trainer node was not removed"
    out = result.return_value
    history = out["history"]
    resumed = [m for m in history if "resized_from" in m]
    assert out["world_size"] == 2 and resumed and resumed[0]["resized_from"] == 3
    # Every record of the epoch once, and the run ended at its planned samples.
    state = TrainerState.load(Path(result.checkpoint.path))
    assert state.epoch == 0 and state.epoch_samples == RECORDS and len(state.seen_keys) == RECORDS
    assert out["samples_seen"] == state.samples_seen == RECORDS
    assert state.plan["world_size"] == 2 and state.plan["total_samples"] == RECORDS
    if policy == "rescale_lr":
        assert [m["step"] for m in history] == [3, 4, 5]  # steps of 8 after the shrink
        assert all(m["global_batch"] == 8 and m["grad_accum"] == 2 for m in history)
        assert history[0]["effective_lr"] == pytest.approx(2e-3 * 8 / 12)
    else:
        assert [m["step"] for m in history] == [3, 4]
        assert all(m["global_batch"] == 12 and m["grad_accum"] == 3 for m in history)
        assert history[0]["effective_lr"] == pytest.approx(2e-3)
    # The schedule (cosine, no warmup) runs over samples: its place is the samples seen, whatever the step size.
    from vistralv_ray.training.optim import sample_lr_factor

    for m in history:
        assert m["lr"] == pytest.approx(m["effective_lr"] * sample_lr_factor(m["samples_seen"], 1, 48, 0, "cosine"))
    r = resumed[0]
    timeline = {
        "detect_and_restart_s": r["resize_attempt_started_at"] - events["removed_at"],
        "build_s": r["resize_build_s"],
        "restore_s": r["resize_restore_s"],
        "first_step_s": r["resize_first_step_s"],
        "since_checkpoint_s": r["resize_s"],
        "run_s": time.time() - started,
    }
    print(f"elastic shrink timeline ({policy}): " + ", ".join(f"{k} {v:.1f}" for k, v in timeline.items()))
