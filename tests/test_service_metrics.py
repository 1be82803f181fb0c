"""What each service exports, from a real scrape, against the naming rules and against every metric name
the Grafana dashboards and the alert rules use; and the health probe the images and TLS pods run."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART_FILES = ROOT / "charts" / "stagetune" / "files"
SERVICES = ("ingest", "vae", "text", "trainer", "validation")
#: Series Prometheus itself makes; the only names the rules may use that no service exports.
PROMETHEUS_OWN = {"up"}
#: What the issue asks the services to export (jobs by state, RPC latency, queue depth, encoding, cache,
#: store, leases, training step time, samples, loss, learning rate, GPU memory).
REQUIRED = {
    "stagetune_jobs_total", "stagetune_active_jobs", "grpc_server_handled_total", "grpc_server_handling_seconds",
    "stagetune_cache_items_encoded_total", "stagetune_cache_hits_total", "stagetune_store_bytes_total",
    "stagetune_store_errors_total", "stagetune_lease_takeovers_total", "stagetune_train_step_seconds",
    "stagetune_train_samples_total", "stagetune_train_loss", "stagetune_train_learning_rate",
    "stagetune_gpu_memory_peak_bytes",
}
BOUNDED_LABELS = {"service", "state", "stage", "model_family", "direction", "operation",
                  "grpc_service", "grpc_method", "grpc_code"}
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan"}


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[int, str]]]:
    """Each service started alone with `stagetune serve`, all at once: service -> (gRPC port, /metrics text)."""
    env = dict(os.environ, STAGETUNE_STORE=str(tmp_path_factory.mktemp("store")))
    procs = {s: subprocess.Popen([sys.executable, "-m", "stagetune.cli", "serve", s, "--port", "0",
                                  "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for s in SERVICES}
    try:
        found = {}
        for service, proc in procs.items():
            line = proc.stdout.readline()
            match = re.search(r"gRPC on [\d.]+:(\d+), metrics on :(\d+)", line)
            assert match, f"{service}: unexpected first line {line!r}"
            port, metrics_port = map(int, match.groups())
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            found[service] = (port, body)
        yield found
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=20)


def exported_names(body: str) -> dict[str, str]:
    """Series name -> family type, from the exposition's TYPE lines (a histogram gives _bucket/_sum/_count)."""
    names = {}
    for name, kind in re.findall(r"(?m)^# TYPE (\S+) (\S+)$", body):
        if kind == "histogram":
            names.update({f"{name}{suffix}": kind for suffix in ("_bucket", "_sum", "_count")})
        names[name] = kind
    return names


def promql_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or labels."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        if not text[match.end():].lstrip().startswith("(") and match.group(0) not in _KEYWORDS:
            names.add(match.group(0))
    return names


def dashboard_exprs() -> dict[str, list[str]]:
    found = {}
    for path in sorted((CHART_FILES / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
        for variable in board["templating"]["list"]:
            query = variable.get("query")
            if isinstance(query, dict):
                exprs += re.findall(r"label_values\((\w+)", query["query"])
        found[path.name] = exprs
    return found


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((CHART_FILES / "prometheus-rules.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_promql_name_parser() -> None:
    assert promql_names('sum by (le, stage) (rate(a_bucket{x="y(z)"}[5m] offset 1h)) / b_total > 1e-9') == {
        "a_bucket", "b_total"}
    assert promql_names("(x > 0) unless on (namespace) (sum by (namespace) (increase(y[15m])) > 0)") == {"x", "y"}


def test_every_service_exports_the_required_metrics(scrapes) -> None:
    for service, (_, body) in scrapes.items():
        missing = REQUIRED - exported_names(body).keys()
        assert not missing, f"{service} does not export {sorted(missing)}"


def test_names_follow_the_prometheus_rules(scrapes) -> None:
    _, body = scrapes["trainer"]
    for name, kind in exported_names(body).items():
        if not name.startswith("stagetune_"):
            continue
        assert (kind == "counter") == name.endswith("_total"), f"{name} ({kind})"
        assert not re.search(r"_(ms|milliseconds|minutes|mb|gb|kb|percent)(_|$)", name), f"{name}: not a base unit"
    from prometheus_client import Counter, Gauge, Histogram

    from stagetune.core import metrics

    objects = [m for m in vars(metrics).values() if isinstance(m, Counter | Gauge | Histogram)]
    assert len(objects) >= 15
    for metric in objects:
        assert set(metric._labelnames) <= BOUNDED_LABELS, f"{metric._name}: unbounded label"


def test_dashboards_and_rules_use_only_exported_names(scrapes) -> None:
    exported = set().union(*(exported_names(body).keys() for _, body in scrapes.values()))
    used: set[str] = set()
    for board, exprs in dashboard_exprs().items():
        names = set().union(*(promql_names(e) for e in exprs))
        assert names - exported == set(), f"{board} uses names no service exports: {sorted(names - exported)}"
        used |= names
    rule_names = set().union(*(promql_names(e) for e in rule_exprs()))
    assert rule_names - exported - PROMETHEUS_OWN == set(), sorted(rule_names - exported)
    used |= rule_names
    # The dashboards show what the issue asks for (each family through at least one of its series).
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert REQUIRED - families == set(), sorted(REQUIRED - families)


def test_active_jobs_gauge_moves_with_the_state() -> None:
    from stagetune.core import metrics
    from stagetune.core.jobs import JobState, _count_active

    def value(state: str) -> float:
        return metrics.ACTIVE_JOBS.labels("probe-service", state)._value.get()

    metrics.ACTIVE_JOBS.labels("probe-service", "queued").inc()
    _count_active("probe-service", JobState.QUEUED, JobState.RUNNING)
    assert (value("queued"), value("running")) == (0, 1)
    _count_active("probe-service", JobState.RUNNING, JobState.FAILED)
    assert (value("queued"), value("running")) == (0, 0)


def test_healthcheck_probe(scrapes) -> None:
    from stagetune import healthcheck

    port, _ = scrapes["vae"]
    assert healthcheck.check(f"127.0.0.1:{port}") == "SERVING"
    assert healthcheck.main(["--address", f"127.0.0.1:{port}"]) == 0
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        closed = free.getsockname()[1]
    assert healthcheck.check(f"127.0.0.1:{closed}", timeout=2).startswith("UNREACHABLE")
    assert healthcheck.main(["--address", f"127.0.0.1:{closed}", "--timeout", "2"]) == 1
