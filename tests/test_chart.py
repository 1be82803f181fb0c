"""The Helm chart, rendered offline: every object valid for Kubernetes, every profile on the right nodes,
and every setting one the services really read.

Rendering uses helm-python-sdk (Helm's Go SDK, values.schema.json enforced as `helm install` does);
objects are checked with kubernetes-validate --strict against the oldest and newest Kubernetes the
chart supports, the Prometheus Operator kinds against our own schemas in tests/schemas/.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

from stagetune.pipeline import DEFAULT_PORTS  # noqa: E402
from stagetune.trainer.kube.profiles import PROFILES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "stagetune"
SCHEMAS = Path(__file__).parent / "schemas"
STAGES = ("ingest", "vae", "text", "trainer", "validation")
GPU_STAGES = ("vae", "text", "trainer", "validation")
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
CRD_SCHEMAS = {"ServiceMonitor": "servicemonitor.json", "PrometheusRule": "prometheusrule.json"}


@pytest.fixture(scope="module")
def chart():
    loaded = helm.Chart.load(str(CHART))
    yield loaded
    loaded.close()


def render(chart: Any, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rendered = chart.render(values or {}, name="st", namespace="ml")
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def deployment(docs: list[dict[str, Any]], stage: str) -> dict[str, Any]:
    (found,) = find(docs, "Deployment", f"st-stagetune-{stage}")
    return found


def pod(docs: list[dict[str, Any]], stage: str) -> dict[str, Any]:
    return deployment(docs, stage)["spec"]["template"]["spec"]


def every_profile(profile: str, count: int = 1) -> dict[str, Any]:
    return {stage: {"gpu": {"profile": profile, "count": 0 if profile == "cpu" else count}} for stage in GPU_STAGES}


MONITORING = {"monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                             "dashboards": {"enabled": True}}}
COMBOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    **{f"profile-{p}": every_profile(p) for p in PROFILES},
    "monitoring": MONITORING,
    "tls": {"tls": {"enabled": True, "secretName": "st-tls"}},
    "mtls-servername": {"tls": {"enabled": True, "secretName": "st-tls", "clientAuth": True,
                                "serverName": "st.internal"}},
    "external-s3": {"s3": {"endpoint": "https://s3.example.com", "bucket": "runs", "prefix": "/team/a/",
                           "region": "eu-west-1", "caBundle": {"configMap": "ca", "key": "bundle.pem"}},
                    "auth": {"existingSecret": "creds"}},
    "no-token-no-netpol-no-pdb": {"auth": {"token": {"enabled": False}}, "networkPolicy": {"enabled": False},
                                  **{s: {"pdb": {"enabled": False}} for s in STAGES}},
    "scaled-and-placed": {"vae": {"replicas": 6, "nodeSelector": {"pool": "enc"}, "env": {"OMP_NUM_THREADS": 8},
                                  "tolerations": [{"key": "team", "operator": "Equal", "value": "ml",
                                                   "effect": "NoSchedule"}]},
                          "text": {"enabled": False}, "nodeSelector": {"zone": "a"},
                          "imagePullSecrets": [{"name": "regcred"}], "config": {"extraEnv": {"HF_ENDPOINT": "http://hub"}},
                          "trainer": {"affinity": {"podAntiAffinity": {}}}},
    "launcher": {"trainer": {"gpu": {"profile": "h200", "count": 8},
                             "launcher": {"enabled": True, "profile": "gb200", "serviceAccount": "st-runs",
                                          "trainJobRuntime": "torch-gb200"}}},
    "launcher-trainjob": {"trainer": {"gpu": {"profile": "h200", "count": 8},
                                      "launcher": {"enabled": True, "runKind": "trainjob", "profile": "mi300x"}}},
    "launcher-mtls": {"trainer": {"gpu": {"profile": "b200", "count": 8}, "launcher": {"enabled": True}},
                      "tls": {"enabled": True, "secretName": "st-tls", "clientAuth": True}},
    "launcher-private-ca": {"trainer": {"gpu": {"profile": "h200", "count": 8},
                                        "launcher": {"enabled": True, "runKind": "job"}},
                            "s3": {"endpoint": "https://s3.example.com", "bucket": "runs",
                                   "caBundle": {"configMap": "ca", "key": "bundle.pem"}},
                            "auth": {"existingSecret": "creds"}},
}


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, list[dict[str, Any]]]:
    return {name: render(chart, values) for name, values in COMBOS.items()}


def test_chart_lints_clean() -> None:
    report = helm.lint(str(CHART), strict=True, namespace="ml")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    for name, values in COMBOS.items():
        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"] == [], name


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_every_object_is_valid_kubernetes(rendered, combo: str) -> None:
    docs = rendered[combo]
    assert len(docs) >= 12
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "two objects share a kind and name"
    for doc in docs:
        if doc["kind"] == "TrainingRuntime":  # Kubeflow Trainer's own API models read it back unchanged
            from kubeflow_trainer_api.models.trainer_v1alpha1_training_runtime import TrainerV1alpha1TrainingRuntime

            assert TrainerV1alpha1TrainingRuntime.from_dict(doc).to_dict() == doc
            continue
        schema = CRD_SCHEMAS.get(doc["kind"])
        if schema:
            jsonschema.validate(doc, json.loads((SCHEMAS / schema).read_text()))
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_crd_schemas_refuse_a_wrong_field(rendered) -> None:
    """Our CRD schemas are strict enough to catch a misspelt field (else the check above proves nothing)."""
    monitor = json.loads(json.dumps(find(rendered["monitoring"], "ServiceMonitor")[0]))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        jsonschema.validate(monitor, json.loads((SCHEMAS / "servicemonitor.json").read_text()))


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_selects_its_nodes(chart, name: str) -> None:
    """Resource, node labels, tolerations, image variant and architecture of each profile, on every GPU stage."""
    profile = PROFILES[name]
    docs = render(chart, every_profile(name, count=2))
    for stage in GPU_STAGES:
        spec = pod(docs, stage)
        (container,) = spec["containers"]
        limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
        gpu_keys = {k for k in {**limits, **requests} if k.endswith("/gpu")}
        if profile.resource:
            assert gpu_keys == {profile.resource}
            assert limits[profile.resource] == requests[profile.resource] == 2
            assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in spec["volumes"])
        else:
            assert gpu_keys == set()
        required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        (term,) = required["nodeSelectorTerms"]
        assert term["matchExpressions"] == profile.node_expressions()
        arch = [e for e in term["matchExpressions"] if e["key"] == "kubernetes.io/arch"]
        assert arch == [{"key": "kubernetes.io/arch", "operator": "In", "values": [profile.arch]}]
        assert spec.get("tolerations", []) == [dict(t) for t in profile.tolerations]
        assert container["image"] == f"ghcr.io/stagetune/stagetune:0.1.0-{profile.image}"
        assert deployment(docs, stage)["spec"]["template"]["metadata"]["labels"]["stagetune.io/gpu-profile"] == name
    # The CPU-only ingest stage is never pulled onto GPU nodes by another stage's profile.
    ingest = pod(docs, "ingest")
    assert "tolerations" not in ingest and "/gpu" not in json.dumps(ingest["containers"][0]["resources"])


def test_profiles_select_the_labels_the_gpu_labellers_set() -> None:
    """The labels and resources ops-facts.md records, spelled out here once more on purpose."""
    expected = {
        "h100": ("nvidia.com/gpu", "nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3", "amd64", "cuda"),
        "h200": ("nvidia.com/gpu", "nvidia.com/gpu.product", "NVIDIA-H200", "amd64", "cuda"),
        "b200": ("nvidia.com/gpu", "nvidia.com/gpu.product", "NVIDIA-B200", "amd64", "cuda"),
        "gb200": ("nvidia.com/gpu", "nvidia.com/gpu.product", "NVIDIA-GB200", "arm64", "cuda"),
        "mi300x": ("amd.com/gpu", "amd.com/gpu.device-id", "74a1", "amd64", "rocm"),
    }
    for name, (resource, key, value, arch, image) in expected.items():
        p = PROFILES[name]
        assert (p.resource, p.arch, p.image) == (resource, arch, image)
        assert any(e["key"] == key and value in e["values"] for e in p.match_expressions), name
        assert {"key": resource, "operator": "Exists", "effect": "NoSchedule"} in p.tolerations
    assert {"key": "kubernetes.io/arch", "operator": "Equal", "value": "arm64",
            "effect": "NoSchedule"} in PROFILES["gb200"].tolerations
    assert PROFILES["cpu"].resource is None and not PROFILES["cpu"].tolerations


def test_values_profiles_equal_the_python_table() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["gpuProfiles"] == {name: p.as_values() for name, p in PROFILES.items()}


def test_user_placement_is_merged_with_the_profile(rendered, chart) -> None:
    spec = pod(rendered["scaled-and-placed"], "vae")
    assert spec["nodeSelector"] == {"pool": "enc", "zone": "a"}
    assert spec["tolerations"] == [*map(dict, PROFILES["h100"].tolerations),
                                   {"key": "team", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    assert pod(rendered["scaled-and-placed"], "trainer")["affinity"]["podAntiAffinity"] == {}
    # Each required term the user gives gets the profile's expressions ANDed in; terms stay ORed.
    terms = [{"matchExpressions": [{"key": "pool", "operator": "In", "values": [p]}]} for p in ("a", "b")]
    docs = render(chart, {"trainer": {"gpu": {"profile": "gb200", "count": 4}, "affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms},
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 5, "preference": {"matchExpressions": [{"key": "fast", "operator": "Exists"}]}}]}}}})
    affinity = pod(docs, "trainer")["affinity"]["nodeAffinity"]
    got = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert got == [{"matchExpressions": [*t["matchExpressions"], *PROFILES["gb200"].node_expressions()]} for t in terms]
    assert affinity["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 5


def test_stage_scaling_and_disabling(rendered) -> None:
    docs = rendered["scaled-and-placed"]
    assert deployment(docs, "vae")["spec"]["replicas"] == 6
    assert not find(docs, "Deployment", "st-stagetune-text") and not find(docs, "Service", "st-stagetune-text")
    assert deployment(docs, "trainer")["spec"]["strategy"] == {"type": "Recreate"}
    env = {e["name"]: e.get("value") for e in pod(docs, "vae")["containers"][0]["env"]}
    assert env["OMP_NUM_THREADS"] == "8"
    assert find(docs, "ConfigMap", "st-stagetune-config")[0]["data"]["HF_ENDPOINT"] == "http://hub"


@pytest.mark.parametrize("values, where, says", [
    ({"trainer": {"gpu": {"profile": "a100", "count": 1}}}, "/trainer/gpu/profile", "must be one of"),
    ({"vae": {"gpu": {"profile": "h100", "count": 0}}}, "/vae/gpu/count", "minimum"),
    ({"trainr": {"replicas": 1}}, "", "'trainr' not allowed"),
    ({"trainer": {"replicas": 2}}, "/trainer/replicas", "maximum"),
    ({"tls": {"enabled": True}}, "/tls/secretName", "minLength"),
    ({"s3": {"bucket": "Runs_2024"}}, "/s3/bucket", "does not match pattern"),
    ({"s3": {"endpoint": "s3.example.com/bucket"}}, "/s3/endpoint", "does not match pattern"),
    ({"runAsUser": 0}, "/runAsUser", "minimum"),
    ({"config": {"logLevel": "LOUD"}}, "/config/logLevel", "must be one of"),
    ({"vae": {"resources": {"limits": {"memory": "lots"}}}}, "/vae/resources/limits/memory", "pattern"),
])
def test_bad_values_are_refused_naming_the_key(chart, values: dict[str, Any], where: str, says: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.render(values, name="st", namespace="ml")
    assert f"at '{where}'" in str(caught.value) and says in str(caught.value)


def test_every_value_is_described_by_the_schema() -> None:
    """Every key of values.yaml appears in values.schema.json (maps of user entries aside)."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(values: Any, node: dict[str, Any], path: str) -> None:
        if not isinstance(values, dict):
            return
        props = node.get("properties")
        if props is None:
            assert "additionalProperties" in node or node.get("type") == "object", path
            return
        for key, value in values.items():
            assert key in props, f"{path}.{key} is not in values.schema.json"
            walk(value, props[key], f"{path}.{key}")

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), schema, "")


def test_commands_and_ports_are_what_stagetune_serve_takes(rendered) -> None:
    from stagetune.cli import build_parser

    docs = rendered["defaults"]
    for stage in STAGES:
        (container,) = pod(docs, stage)["containers"]
        args = build_parser().parse_args(container["args"])
        assert (args.command, args.service, args.host) == ("serve", stage, "0.0.0.0")
        assert (args.port, args.metrics_port) == DEFAULT_PORTS[stage]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert (ports["grpc"], ports["metrics"]) == DEFAULT_PORTS[stage]
        (service,) = find(docs, "Service", f"st-stagetune-{stage}")
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
        assert service["metadata"]["labels"]["stagetune.io/job"] == f"stagetune-{stage}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": DEFAULT_PORTS[stage][0]}


def _env_names(docs: list[dict[str, Any]]) -> set[str]:
    names: set[str] = set()
    for doc in find(docs, "Deployment"):
        for container in doc["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in container.get("env", [])}
    for cm in find(docs, "ConfigMap", "st-stagetune-config"):
        names |= set(cm["data"])
    return names


def test_every_stagetune_variable_set_is_one_the_code_reads(rendered) -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "services" / "stagetune").rglob("*.py") if "_pb2" not in p.name)
    names = set().union(*(_env_names(docs) for docs in rendered.values()))
    ours = {n for n in names if n.startswith("STAGETUNE_")}
    assert {"STAGETUNE_STORE", "STAGETUNE_S3_ACCESS_KEY", "STAGETUNE_API_TOKEN_FILE", "STAGETUNE_TLS_CERT",
            "STAGETUNE_TLS_CLIENT_CA", "STAGETUNE_TLS_SERVER_NAME", "STAGETUNE_LEASE_TTL_S"} <= ours
    for name in ours:
        assert re.search(rf"[\"']{name}[\"']", source), f"{name} is set by the chart but read nowhere"


def test_store_url_opens_as_the_services_would(rendered, monkeypatch) -> None:
    from stagetune.core.store import open_store

    monkeypatch.setenv("STAGETUNE_S3_ACCESS_KEY", "a" * 8)
    monkeypatch.setenv("STAGETUNE_S3_SECRET_KEY", "b" * 16)
    bundled = open_store(find(rendered["defaults"], "ConfigMap", "st-stagetune-config")[0]["data"]["STAGETUNE_STORE"])
    assert (bundled.endpoint, bundled.bucket, bundled.prefix, bundled.secure) == (
        "st-stagetune-s3:8333", "stagetune", "", False)
    (s3_service,) = find(rendered["defaults"], "Service", "st-stagetune-s3")
    assert s3_service["spec"]["ports"][0]["port"] == 8333
    url = find(rendered["external-s3"], "ConfigMap", "st-stagetune-config")[0]["data"]["STAGETUNE_STORE"]
    external = open_store(url)
    assert (external.endpoint, external.bucket, external.prefix, external.secure) == (
        "s3.example.com", "runs", "team/a/", True)
    assert "region=eu-west-1" in url and "ca_bundle=/etc/stagetune/s3-ca/bundle.pem" in url
    mounts = {m["mountPath"] for m in pod(rendered["external-s3"], "vae")["containers"][0]["volumeMounts"]}
    assert "/etc/stagetune/s3-ca" in mounts
    assert not find(rendered["external-s3"], "Deployment", "st-stagetune-s3")
    assert not find(rendered["external-s3"], "PersistentVolumeClaim")


def test_bundled_store_and_bucket_job(rendered) -> None:
    docs = rendered["defaults"]
    (server,) = find(docs, "Deployment", "st-stagetune-s3")
    container = server["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("chrislusf/seaweedfs:") and "-s3.port=8333" in container["args"]
    assert {e["name"] for e in container["env"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert server["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "st-stagetune-s3"
    (claim,) = find(docs, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    (job,) = find(docs, "Job", "st-stagetune-create-bucket")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["S3_ENDPOINT"], env["S3_BUCKET"]) == ("http://st-stagetune-s3:8333", "stagetune")
    compile(job["spec"]["template"]["spec"]["containers"][0]["args"][0], "create-bucket", "exec")


def test_credentials_come_from_the_secret(rendered, chart) -> None:
    docs = render(chart, {"auth": {"s3AccessKey": "AK", "s3SecretKey": "SK", "token": {"value": "tok"}}})
    (secret,) = find(docs, "Secret")
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "s3-access-key": "AK", "s3-secret-key": "SK", "api-token": "tok"}
    generated = find(rendered["defaults"], "Secret")[0]["data"]
    assert all(len(base64.b64decode(v)) == 40 for v in generated.values())
    docs = rendered["external-s3"]
    assert not find(docs, "Secret")
    env = {e["name"]: e for e in pod(docs, "trainer")["containers"][0]["env"]}
    assert env["STAGETUNE_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "creds", "key": "s3-secret-key"}
    assert env["STAGETUNE_API_TOKEN_FILE"]["value"] == "/var/run/stagetune/auth/api-token"
    auth = [v for v in pod(docs, "trainer")["volumes"] if v["name"] == "auth"][0]
    assert auth["secret"]["secretName"] == "creds"
    assert auth["secret"]["items"] == [{"key": "api-token", "path": "api-token"}]
    assert "STAGETUNE_API_TOKEN_FILE" not in _env_names(rendered["no-token-no-netpol-no-pdb"])


def test_tls_files_and_probes(rendered) -> None:
    for combo, mutual in (("tls", False), ("mtls-servername", True)):
        (container,) = pod(rendered[combo], "trainer")["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["STAGETUNE_TLS_CERT"] == "/var/run/stagetune/tls/tls.crt"
        assert env["STAGETUNE_TLS_CA"] == "/var/run/stagetune/tls/ca.crt"
        assert ("STAGETUNE_TLS_CLIENT_CA" in env) == mutual and ("STAGETUNE_TLS_CLIENT_CERT" in env) == mutual
        # The kubelet's grpc probe cannot speak TLS: the probe runs our health client in the container.
        command = container["readinessProbe"]["exec"]["command"]
        assert command[:3] == ["python", "-m", "stagetune.healthcheck"]
        assert command[command.index("--address") + 1] == "127.0.0.1:50054"
        name = "st.internal" if mutual else "st-stagetune-trainer"
        assert command[command.index("--server-name") + 1] == name
        assert "grpc" not in container["livenessProbe"]


def test_hardening(rendered) -> None:
    for combo, docs in rendered.items():
        for doc in find(docs, "Deployment") + find(docs, "Job"):
            spec = doc["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
            # Only a trainer that launches Kubernetes runs holds an API token (test_the_launcher_gets_…).
            launches = combo.startswith("launcher") and doc["metadata"]["name"] == "st-stagetune-trainer"
            assert spec["automountServiceAccountToken"] is launches, (combo, doc["metadata"]["name"])
            emptydirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
            for container in spec["containers"]:
                sc = container["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, combo
                assert sc["capabilities"] == {"drop": ["ALL"]}
                assert "memory" in container["resources"]["limits"]
                if doc["kind"] == "Deployment" and doc["metadata"]["name"] != "st-stagetune-s3":
                    writable = {m["mountPath"]: m["name"] for m in container["volumeMounts"] if not m.get("readOnly")}
                    assert writable.keys() >= {"/tmp", "/cache"} and set(writable.values()) <= emptydirs
    docs = rendered["defaults"]
    config = find(docs, "ConfigMap", "st-stagetune-config")[0]["data"]
    assert config["HF_HOME"].startswith("/cache/") and config["HOME"] == config["XDG_CACHE_HOME"] == "/cache"
    assert pod(docs, "trainer")["terminationGracePeriodSeconds"] >= 600
    assert {d["metadata"]["name"] for d in find(docs, "PodDisruptionBudget")} == {f"st-stagetune-{s}" for s in STAGES}
    assert not find(rendered["no-token-no-netpol-no-pdb"], "PodDisruptionBudget")


def test_network_policy_opens_only_the_service_ports(rendered) -> None:
    (services,) = find(rendered["defaults"], "NetworkPolicy", "st-stagetune-services")
    (s3,) = find(rendered["defaults"], "NetworkPolicy", "st-stagetune-s3")
    grpc_rule, metrics_rule = services["spec"]["ingress"]
    assert sorted(p["port"] for p in grpc_rule["ports"]) == sorted(p[0] for p in DEFAULT_PORTS.values())
    assert sorted(p["port"] for p in metrics_rule["ports"]) == sorted(p[1] for p in DEFAULT_PORTS.values())
    assert grpc_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "st"
    assert s3["spec"]["ingress"][0]["ports"] == [{"port": 8333, "protocol": "TCP"}]
    assert len(find(rendered["external-s3"], "NetworkPolicy")) == 1
    assert not find(rendered["no-token-no-netpol-no-pdb"], "NetworkPolicy")


def test_monitoring_objects(rendered, chart) -> None:
    docs = rendered["monitoring"]
    monitors = find(docs, "ServiceMonitor")
    assert sorted(m["metadata"]["name"] for m in monitors) == sorted(f"st-stagetune-{s}" for s in STAGES)
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        assert monitor["spec"]["jobLabel"] == "stagetune.io/job"
    docs = render(chart, {"monitoring": {"serviceMonitor": {"enabled": True, "labels": {"prometheus": "team"}}}})
    assert find(docs, "ServiceMonitor")[0]["metadata"]["labels"]["prometheus"] == "team"
    (rule,) = find(rendered["monitoring"], "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"StagetuneServiceDown", "StagetuneJobFailed", "StagetuneCacheHitRatioCollapse",
            "StagetuneTrainingStalled", "StagetuneStepTimeRegression"} <= alerts
    dashboards = [d for d in find(rendered["monitoring"], "ConfigMap") if "dashboard" in d["metadata"]["name"]]
    assert len(dashboards) == len(list((CHART / "files" / "dashboards").glob("*.json"))) >= 2
    for cm in dashboards:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((CHART / "files" / "dashboards" / key).read_text())
    assert not find(rendered["defaults"], "ServiceMonitor") and not find(rendered["defaults"], "PrometheusRule")


def test_the_trainer_reaches_validation_by_its_service(rendered, chart) -> None:
    """`stagetune train --endpoint` cannot name validation's in-cluster address: the chart gives it the trainer."""
    (container,) = pod(rendered["defaults"], "trainer")["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    (service,) = find(rendered["defaults"], "Service", "st-stagetune-validation")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert env["STAGETUNE_VALIDATION_ENDPOINT"] == f"st-stagetune-validation:{grpc_port}"
    for stage in ("ingest", "vae", "text", "validation"):
        (other,) = pod(rendered["defaults"], stage)["containers"]
        assert "STAGETUNE_VALIDATION_ENDPOINT" not in {e["name"] for e in other["env"]}
    (alone,) = pod(render(chart, {"validation": {"enabled": False}}), "trainer")["containers"]
    assert "STAGETUNE_VALIDATION_ENDPOINT" not in {e["name"] for e in alone["env"]}


def test_the_launcher_gets_its_settings_rbac_and_network(rendered) -> None:
    """With trainer.launcher on, the trainer's environment is what LauncherSettings reads, its service account
    may do what the client calls, and the training pods (as objects.py labels them) reach each other, the
    bundled S3 and validation."""
    from stagetune.trainer.kube.launcher import LauncherSettings
    from stagetune.trainer.kube.objects import RunPod, image_for, train_job, training_objects

    docs = rendered["launcher"]
    trainer = pod(docs, "trainer")
    assert trainer["automountServiceAccountToken"] is True
    assert all(pod(docs, s)["automountServiceAccountToken"] is False for s in ("ingest", "vae", "validation"))
    (container,) = trainer["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    namespace_ref = next(e for e in container["env"] if e["name"] == "STAGETUNE_KUBE_NAMESPACE")
    assert namespace_ref["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    settings = LauncherSettings.from_env({**{k: v for k, v in env.items() if v is not None},
                                          "STAGETUNE_KUBE_NAMESPACE": "ml"})
    assert settings == LauncherSettings(image=image_for("ghcr.io/stagetune/stagetune", "0.1.0", PROFILES["gb200"]),
                                        profile="gb200", namespace="ml", secret="st-stagetune-auth",
                                        service_account="st-runs", local_gpus=8, run_kind="auto",
                                        trainjob_runtime="torch-gb200", trainjob_runtime_kind="ClusterTrainingRuntime")
    (role,) = find(docs, "Role")
    verbs = {(r["apiGroups"][0], res): set(r["verbs"]) for r in role["rules"] for res in r["resources"]}
    assert {"create", "get", "delete"} <= verbs[("batch", "jobs")]
    assert {"create", "get", "delete"} <= verbs[("trainer.kubeflow.org", "trainjobs")]  # runKind auto may use them
    assert {"create", "delete"} <= verbs[("", "services")] and {"list", "get"} <= verbs[("", "pods")]
    (binding,) = find(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": trainer["serviceAccountName"], "namespace": "ml"}]

    run_pod = RunPod(profile=PROFILES["gb200"], gpus_per_node=4, store_url="s3://b", secret_name="s")
    job, _ = training_objects(run="st-x", namespace="ml", nodes=2, image="i", worker=["-m", "w"], pod=run_pod)
    labels = job["spec"]["template"]["metadata"]["labels"]
    kubeflow = train_job(run="st-x", namespace="ml", nodes=2, image="i", worker=["-m", "w"], pod=run_pod)
    patched = kubeflow["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert patched["template"]["spec"]["template"]["metadata"]["labels"] == labels  # the same policies apply
    (runs,) = find(docs, "NetworkPolicy", "st-stagetune-training-runs")
    assert runs["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert runs["spec"]["ingress"] == [{"from": [{"podSelector": runs["spec"]["podSelector"]}]}]  # any port
    for name in ("st-stagetune-services", "st-stagetune-s3"):
        (policy,) = find(docs, "NetworkPolicy", name)
        peers = policy["spec"]["ingress"][0]["from"]
        assert any(p.get("podSelector", {}).get("matchLabels", {}).items() <= labels.items()
                   and p["podSelector"]["matchLabels"] for p in peers), name

    defaults = rendered["defaults"]
    assert not find(defaults, "Role") and not find(defaults, "RoleBinding")
    assert not find(defaults, "NetworkPolicy", "st-stagetune-training-runs")
    (plain,) = pod(defaults, "trainer")["containers"]
    assert not {e["name"] for e in plain["env"]} & {"STAGETUNE_TRAINER_LAUNCHER", "STAGETUNE_KUBE_IMAGE"}


def test_train_jobs_get_the_charts_own_runtime_that_fails_a_run_instead_of_restarting_it(rendered) -> None:
    """runKind trainjob: the chart makes a TrainingRuntime whose pods are never restarted in place, get the
    trainer's grace period for the last checkpoint and no API token (none of which a TrainJob's runtime patch may
    set), and the launcher is told to use it. Without Kubeflow on the API (auto, offline) it is not made."""
    from stagetune.trainer.kube.launcher import LauncherSettings

    docs = rendered["launcher-trainjob"]
    (runtime,) = find(docs, "TrainingRuntime")
    assert runtime["metadata"]["name"] == "st-stagetune-training"
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}
    (replicated,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"
    assert replicated["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    job_spec = replicated["template"]["spec"]
    pod_spec = job_spec["template"]["spec"]
    assert job_spec["backoffLimit"] == 0 and pod_spec["restartPolicy"] == "Never"
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["terminationGracePeriodSeconds"] == pod(docs, "trainer")["terminationGracePeriodSeconds"] == 900
    assert pod_spec["containers"] == [{"name": "node", "image": "ghcr.io/stagetune/stagetune:0.1.0-rocm"}]
    (container,) = pod(docs, "trainer")["containers"]
    env = {e["name"]: e.get("value") for e in container["env"] if e.get("value") is not None}
    settings = LauncherSettings.from_env({**env, "STAGETUNE_KUBE_NAMESPACE": "ml"})
    assert settings is not None and settings.run_kind == "trainjob"
    assert (settings.trainjob_runtime_kind, settings.trainjob_runtime) == ("TrainingRuntime", "st-stagetune-training")

    for combo in ("launcher", "launcher-mtls", "launcher-private-ca", "defaults"):
        assert not find(rendered[combo], "TrainingRuntime"), combo
    (named,) = pod(rendered["launcher"], "trainer")["containers"]
    assert {"name": "STAGETUNE_KUBE_TRAINJOB_RUNTIME", "value": "torch-gb200"} in named["env"]


def test_training_pods_call_validation_over_tls_as_the_trainer_does(rendered, monkeypatch) -> None:
    """With the chart's (mutual) TLS, the launcher mounts the same Secret in the training pods where the trainer
    has it, and gives rank 0 the trainer's own client settings, whose files are then there."""
    from stagetune.trainer.kube import launcher
    from stagetune.trainer.kube.objects import TLS_DIR, RunPod, training_objects

    docs = rendered["launcher-mtls"]
    trainer = pod(docs, "trainer")
    (container,) = trainer["containers"]
    env = {e["name"]: e.get("value") for e in container["env"] if e.get("value") is not None}
    settings = launcher.LauncherSettings.from_env({**env, "STAGETUNE_KUBE_NAMESPACE": "ml"})
    assert settings is not None and settings.tls_secret == "st-tls"
    (tls_mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert tls_mount["mountPath"] == TLS_DIR
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client_env = launcher._tls_client_env()
    assert set(client_env) == {"STAGETUNE_TLS_CA", "STAGETUNE_TLS_CLIENT_CERT", "STAGETUNE_TLS_CLIENT_KEY"}
    run_pod = RunPod(profile=PROFILES["b200"], gpus_per_node=8, store_url="s3://b", secret_name="s",
                     env=client_env, tls_secret=settings.tls_secret)
    job, _ = training_objects(run="st-x", namespace="ml", nodes=2, image="i", worker=["-m", "w"], pod=run_pod)
    worker_pod = job["spec"]["template"]["spec"]
    (worker,) = worker_pod["containers"]
    assert {"name": "tls", "secret": {"secretName": "st-tls"}} in worker_pod["volumes"]
    assert {"name": "tls", "mountPath": TLS_DIR, "readOnly": True} in worker["volumeMounts"]
    worker_env = {e["name"]: e.get("value") for e in worker["env"]}
    for name, path in client_env.items():
        assert worker_env[name] == path and path.startswith(TLS_DIR + "/")
    assert not {"STAGETUNE_TLS_CERT", "STAGETUNE_TLS_KEY"} & set(worker_env)  # the pods serve nothing
    for version in ("1.25.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(job, version, strict=True)
    assert "STAGETUNE_KUBE_TLS_SECRET" not in _env_names(rendered["launcher"])  # no TLS: nothing to mount


def test_training_pods_mount_the_s3_ca_bundle_the_store_url_names(rendered) -> None:
    """With a private CA, the trainer tells the launcher where the bundle is, and the training pods mount it at
    the path the store URL (the services' own) names, so the workers reach S3 as the services do."""
    from stagetune.trainer.kube.launcher import LauncherSettings
    from stagetune.trainer.kube.objects import S3_CA_DIR, RunPod, training_objects

    docs = rendered["launcher-private-ca"]
    (container,) = pod(docs, "trainer")["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STAGETUNE_KUBE_S3_CA"] == "ca:bundle.pem"
    settings = LauncherSettings.from_env({**{k: v for k, v in env.items() if v is not None},
                                          "STAGETUNE_KUBE_NAMESPACE": "ml"})
    assert settings is not None and settings.s3_ca == ("ca", "bundle.pem") and settings.run_kind == "job"
    (role,) = find(docs, "Role")  # runKind job: the trainer may not touch TrainJobs
    assert not [r for r in role["rules"] if "trainer.kubeflow.org" in r["apiGroups"]]
    store_url = next(doc for doc in find(docs, "ConfigMap") if "STAGETUNE_STORE" in doc.get("data", {}))[
        "data"]["STAGETUNE_STORE"]
    assert f"ca_bundle={S3_CA_DIR}/bundle.pem" in store_url
    run_pod = RunPod(profile=PROFILES["h200"], gpus_per_node=8, store_url=store_url, secret_name="creds",
                     s3_ca=settings.s3_ca)
    job, _ = training_objects(run="st-x", namespace="ml", nodes=2, image="i", worker=["-m", "w"], pod=run_pod)
    worker_pod = job["spec"]["template"]["spec"]
    assert {"name": "s3-ca", "mountPath": S3_CA_DIR, "readOnly": True} in worker_pod["containers"][0]["volumeMounts"]
    assert {"name": "s3-ca", "configMap": {"name": "ca", "items": [{"key": "bundle.pem", "path": "bundle.pem"}]}} \
        in worker_pod["volumes"]
    for version in ("1.25.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(job, version, strict=True)
