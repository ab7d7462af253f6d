"""Monitoring, offline: the Grafana dashboard charts only metrics the training code exports, every one
filtered by run; the workers record them with the run (and rank) tags; the cluster files point the Ray
dashboard at Grafana and Prometheus at every node's metrics port."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from vistralv_ray.training import metrics as training_metrics
from vistralv_ray.training.metrics import EXPORTED_METRICS, RANK_TAG, RUN_TAG, DashboardMetrics, prometheus_names

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
DASHBOARD = CLUSTER / "grafana" / "vistralv-ray.json"
METRIC = re.compile(r"\bray_vistralv_\w+")
RUN_FILTER = f'{RUN_TAG}=~"$run"'
# What the operations issue asks the dashboard to show, as the code names them.
REQUIRED = {
    "loss": "ray_vistralv_loss",
    "eval loss": "ray_vistralv_eval_loss",
    "LR": "ray_vistralv_lr",
    "projector LR": "ray_vistralv_projector_lr",
    "tokens/s": "ray_vistralv_tokens_per_s",
    "samples/s": "ray_vistralv_samples_per_s",
    "MFU": "ray_vistralv_mfu",
    "data wait per rank": "ray_vistralv_data_wait_fraction",
    "memory": "ray_vistralv_memory_mb",
    "rejected records": "ray_vistralv_rejected_records",
    "resizes": "ray_vistralv_resizes_total",
}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel's targets."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def test_every_panel_charts_metrics_the_code_exports_filtered_by_run(dashboard):
    exported = prometheus_names()
    assert len(queries(dashboard)) >= len(dashboard["panels"]) >= len(REQUIRED) - 2
    for title, expr in queries(dashboard):
        names = set(METRIC.findall(expr))
        assert names, (title, expr)
        assert names <= exported, (title, sorted(names - exported))
        assert RUN_FILTER in expr, (title, expr)  # the run variable filters every query
    charted = {n for _, expr in queries(dashboard) for n in METRIC.findall(expr)}
    assert {what: name for what, name in REQUIRED.items() if name not in charted} == {}


def test_per_rank_panels_keep_the_rank_apart(dashboard):
    for title, expr in queries(dashboard):
        code_names = [n.removeprefix("ray_vistralv_").removesuffix("_total") for n in METRIC.findall(expr)]
        per_rank = [n for n in code_names if RANK_TAG in EXPORTED_METRICS[n][2]]
        if per_rank:
            assert f"by ({RUN_TAG}, {RANK_TAG})" in expr, (title, expr)


def test_the_run_variable_lists_ray_trains_run_names(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    run = variables["run"]
    (name,) = METRIC.findall(run["definition"])
    assert name in prometheus_names() and f", {RUN_TAG})" in run["definition"]
    assert run["multi"] and run["includeAll"]
    assert variables["datasource"]["query"] == "prometheus"
    datasources = {json.dumps(p["datasource"]) for p in dashboard["panels"]}
    assert datasources == {json.dumps({"type": "prometheus", "uid": "${datasource}"})}


class FakeMetric:
    """Stands in for ray.util.metrics.Gauge / Counter: remembers what was recorded, with which tags."""

    made: dict[str, FakeMetric] = {}

    def __init__(self, name: str, description: str = "", tag_keys: tuple = ()):
        self.name, self.tag_keys, self.values = name, tag_keys, []
        FakeMetric.made[name] = self

    def _record(self, value: float, tags: dict) -> None:
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        self.values.append((value, tags))

    def set(self, value: float, tags: dict) -> None:
        self._record(value, tags)

    def inc(self, value: float, tags: dict) -> None:
        assert value > 0, self.name  # Ray refuses a counter increment of 0
        self._record(value, tags)


@pytest.fixture()
def fake_metrics(monkeypatch):
    import ray.util.metrics

    FakeMetric.made = {}
    monkeypatch.setattr(ray.util.metrics, "Gauge", FakeMetric)
    monkeypatch.setattr(ray.util.metrics, "Counter", FakeMetric)
    return FakeMetric.made


REPORT = {
    "step": 4, "loss": 2.5, "eval_loss": 2.7, "lr": 1e-4, "projector_lr": 2e-4, "grad_norm": 1.5,
    "samples_per_s": 8.0, "tokens_per_s": 900.0, "tflops_per_device": 0.1, "mfu": 0.4,
    "data_wait_fraction": 0.25, "memory_mb": 1234.0, "rejected_records": 3, "rejected_missing_image": 2,
    "rejected_too_long": 1, "world_size": 2, "global_batch": 8, "effective_lr": 1e-4, "samples_seen": 32,
    "resize_s": 12.0, "bench/exact_match": 0.25, "bench/cider": 1.5,
}  # fmt: skip


def test_rank_zero_records_every_metric_with_the_run_tag(fake_metrics):
    DashboardMetrics("align-test", rank=0).record(REPORT, steps=2, tokens=500)
    assert {f"vistralv_{k}" for k in EXPORTED_METRICS} == set(fake_metrics)
    unrecorded = [name for name, m in fake_metrics.items() if not m.values]
    assert unrecorded == []
    for name, metric in fake_metrics.items():
        for _, tags in metric.values:
            assert tags[RUN_TAG] == "align-test", name
    assert fake_metrics["vistralv_data_wait_fraction"].values == [(0.25, {RUN_TAG: "align-test", RANK_TAG: "0"})]
    by_reason = {tags["reason"]: v for v, tags in fake_metrics["vistralv_rejected_records_by_reason"].values}
    assert by_reason == {"missing_image": 2.0, "too_long": 1.0}
    by_metric = {tags["metric"]: v for v, tags in fake_metrics["vistralv_benchmark"].values}
    assert by_metric == {"exact_match": 0.25, "cider": 1.5}  # train.benchmark's bench/<metric>
    assert fake_metrics["vistralv_resizes"].values == [(1, {RUN_TAG: "align-test"})]
    assert fake_metrics["vistralv_steps"].values == [(2, {RUN_TAG: "align-test"})]


def test_other_ranks_record_only_their_own_data_wait_and_memory(fake_metrics):
    recorder = DashboardMetrics("align-test", rank=1)
    recorder.record({**REPORT, "data_wait_fraction": 0.5, "memory_mb": 999.0}, steps=2, tokens=500)
    recorded = {name: m.values for name, m in fake_metrics.items() if m.values}
    assert recorded == {
        "vistralv_data_wait_fraction": [(0.5, {RUN_TAG: "align-test", RANK_TAG: "1"})],
        "vistralv_memory_mb": [(999.0, {RUN_TAG: "align-test", RANK_TAG: "1"})],
    }
    # No resize, nothing rejected, no step in the window: nothing to add to the counters.
    DashboardMetrics("b", rank=0).record({"loss": 1.0}, steps=0, tokens=0)
    assert fake_metrics["vistralv_resizes"].values == fake_metrics["vistralv_steps"].values == []


def test_prometheus_names_follow_rays_naming():
    names = prometheus_names()
    assert "ray_vistralv_loss" in names and "ray_vistralv_steps_total" in names
    assert "ray_vistralv_steps" not in names  # counters get `_total`
    assert training_metrics.RUN_TAG == "ray_train_run_name"  # Ray Train's own label of its metrics


# ---- cluster settings -------------------------------------------------------------------------------

DASHBOARD_ENV = {"RAY_GRAFANA_HOST", "RAY_PROMETHEUS_HOST", "RAY_GRAFANA_IFRAME_HOST"}


def test_the_rayjob_head_reads_the_grafana_settings_and_every_pod_exposes_metrics():
    rayjob = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    configmap = yaml.safe_load((CLUSTER / "monitoring" / "ray-dashboard-grafana.yaml").read_text())
    assert DASHBOARD_ENV | {"RAY_PROMETHEUS_NAME"} <= set(configmap["data"])
    assert all(configmap["data"][k].startswith("http") for k in DASHBOARD_ENV)
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"configMapRef": {"name": configmap["metadata"]["name"], "optional": True}} in head["envFrom"]

    monitor = yaml.safe_load((CLUSTER / "monitoring" / "podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert str(ports.get(endpoint["port"])) == group["rayStartParams"]["metrics-export-port"], group


def test_the_launcher_head_points_the_dashboard_at_grafana_and_prometheus_scrapes_the_nodes():
    launcher = yaml.safe_load((CLUSTER / "aws-a100.yaml").read_text())
    (start,) = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    settings = dict(re.findall(r"\b(RAY_[A-Z_]+)=(\S+)", start.split("ray start")[0]))
    assert DASHBOARD_ENV <= set(settings), start
    assert "--metrics-export-port=8080" in start
    prometheus = yaml.safe_load((CLUSTER / "monitoring" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["file_sd_configs"] == [{"files": ["/tmp/ray/prom_metrics_service_discovery.json"]}]
    assert settings["RAY_PROMETHEUS_HOST"].endswith(":9090")
