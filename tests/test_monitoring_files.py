"""The monitoring files (compose profile, Prometheus config, Grafana dashboard) hold together.

Docker is not run here: these tests read the files as Docker, Prometheus and Grafana would and
check that what one names, another provides: mounted files exist, Prometheus scrapes the
runtime service on the port its ``--http`` listens on, and every metric a panel queries is one
the runtime exports, so renaming a metric breaks this test rather than the dashboard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, ProcessCollector

from .conftest import ROOT

COMPOSE = ROOT / "compose.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "runtime-dashboard.json"

# What ``runtime serve --http`` exports at /metrics (histograms as their series).
HISTOGRAMS = ("fn_duration_seconds", "fn_cron_lateness_seconds")
METRICS = {"fn_invocations_total", "fn_in_flight", "fn_queue_depth", "fn_ack_pending", "fn_redeliveries_total",
           "fn_dead_letters", "fn_cron_ticks_total", "runtime_nats_connected", "runtime_nats_reconnects_total",
           *(f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count"))}


def process_metrics() -> set[str]:
    """The process metrics prometheus-client exports, by its own account."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return {sample.name for family in registry.collect() for sample in family.samples}


# PromQL words that are not metric names.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
            "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a ``label_values(...)`` query) selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                        # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)                                 # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)                                # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"label_values\s*\(([^,)]*),[^)]*\)", r"\1", expr)       # its label argument
    expr = re.sub(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", " ", expr)               # numbers
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end():].lstrip().startswith("(") or match.group().lower() in KEYWORDS:
            continue   # a function
        names.add(match.group())
    return names


def test_metric_names_are_read_out_of_expressions() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le, function) '
                        '(rate(fn_duration_seconds_bucket{job=~"$job", function=~"a|b"}[$__rate_interval])))') == {
        "fn_duration_seconds_bucket"}
    assert metric_names("sum(rate(x_total[5m])) / on (instance) group_left up > bool 1e-9") == {"x_total", "up"}
    assert metric_names("label_values(fn_invocations_total, function)") == {"fn_invocations_total"}


# ------------------------------------------------------------------ compose.yaml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def http_port(compose: dict[str, Any]) -> int:
    """The port ``runtime serve --http`` listens on in the runtime service."""
    match = re.search(r"runtime serve\b.*--http[ =]0\.0\.0\.0:(\d+)", command_text(compose["services"]["runtime"]))
    assert match, "the runtime listens for Prometheus on every interface of its container"
    return int(match[1])


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(file or directory in the repository, path in the container) of each bind mount."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts.append(((ROOT / source).resolve(), target))
    return mounts


def test_the_default_services_still_run_nats_and_a_runtime(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {name for name, s in services.items() if not s.get("profiles")} == {"nats", "runtime"}
    assert services["nats"]["image"].startswith("nats:") and "-js" in services["nats"]["command"]
    runtime = services["runtime"]
    assert "runtime serve --manifests manifests/" in command_text(runtime)
    assert runtime["environment"]["NATS_URL"] == "nats://nats:4222"
    assert http_port(compose) == 9090
    # Not published on the host: replicas (--scale runtime=3) would compete for the port.
    assert "ports" not in runtime


def test_the_monitoring_profile_runs_prometheus_and_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    monitoring = {name for name, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"prometheus", "grafana"}
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["image"].startswith("prom/prometheus:v") and grafana["image"].startswith("grafana/grafana:")
    assert "9090:9090" in prometheus["ports"] and "3000:3000" in grafana["ports"]
    assert "runtime" in prometheus["depends_on"] and "prometheus" in grafana["depends_on"]

    # Every file mounted is in the repository, and each lands where its program reads it.
    for name in monitoring:
        for source, _ in bind_mounts(services[name]):
            assert source.exists(), f"{name} mounts {source}, which is missing"
    prometheus_mounts = {target: source for source, target in bind_mounts(prometheus)}
    config = re.search(r"--config\.file=(\S+)", command_text(prometheus))
    assert config and prometheus_mounts[config[1]] == PROMETHEUS
    grafana_mounts = {target: source for source, target in bind_mounts(grafana)}
    assert grafana_mounts["/etc/grafana/provisioning"] == ROOT / "deploy" / "grafana" / "provisioning"
    [dashboard_target] = [t for t, s in grafana_mounts.items() if s == DASHBOARD]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_target

    # Named volumes are declared.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"volume {source} is not declared"


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose: dict[str, Any]) -> None:
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    port = re.search(r"(\d+)$", compose["services"]["prometheus"]["ports"][0])
    assert port and source["url"] == f"http://prometheus:{port[1]}", "the prometheus service, on its port"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "runtime.yml").read_text())["providers"]
    grafana_mounts = {target: source for source, target in bind_mounts(compose["services"]["grafana"])}
    assert grafana_mounts[f"{provider['options']['path']}/{DASHBOARD.name}"] == DASHBOARD


def test_prometheus_scrapes_every_runtime_on_its_http_port(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "runtime"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # DNS discovery: the service name resolves to every replica of the runtime service.
    [discovery] = job["dns_sd_configs"]
    assert discovery["names"] == ["runtime"] and "runtime" in compose["services"]
    assert discovery["type"] == "A" and discovery["port"] == http_port(compose)


# ------------------------------------------------------------------ the dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_the_dashboard_picks_its_data_source_and_functions(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    function = variables["function"]
    assert function["type"] == "query" and function["includeAll"] and function["multi"]
    assert function["query"]["query"] == function["definition"] == "label_values(fn_invocations_total, function)"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"


def test_every_panel_queries_the_chosen_data_source(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip(), panel["title"]


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_metric_in_the_dashboard_is_one_the_runtime_exports(dashboard: dict[str, Any]) -> None:
    exported = METRICS | process_metrics()
    used: dict[str, set[str]] = {}
    queries = [(p["title"], t["expr"]) for p in panels(dashboard) for t in p["targets"]]
    queries += [(v["name"], v["query"]["query"]) for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for title, expr in queries:
        for name in metric_names(expr):
            assert name in exported, f"{title!r} queries {name}, which the runtime does not export"
            used.setdefault(name, set()).add(title)
    # And the dashboard shows each of them: a new metric of the list needs a panel.
    shown = {name for name in METRICS if not name.endswith(("_sum", "_count"))}
    assert shown - set(used) == set(), "metrics without a panel"
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= set(used)
