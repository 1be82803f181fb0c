"""The trainer's Kubernetes launcher: when a run goes to the cluster, the worker spec through the store, and a
run driven against the loopback API server of test_kube_jobs.py (pods replayed as the API server reports them).

Not tested (no cluster): torchrun and the workers inside real pods; the worker's store-spec path is tested here
by reading back what the launcher wrote, and the worker's training by tests/test_distributed.py.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

kubernetes = pytest.importorskip("kubernetes")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

import test_kube_jobs  # noqa: E402
from test_kube_jobs import FakeApi, _pod  # noqa: E402

from stagetune.core.errors import ConfigError, NotFoundError  # noqa: E402
from stagetune.core.jobs import JobCancelled  # noqa: E402
from stagetune.core.store.local import LocalStore  # noqa: E402
from stagetune.trainer.kube.client import TrainingJobError  # noqa: E402
from stagetune.trainer.kube.launcher import LauncherSettings, launcher_for, run_name, run_on_cluster  # noqa: E402
from stagetune.trainer.worker import load_spec, result_key, spec_key, write_spec  # noqa: E402
from stagetune.v1 import trainer_pb2  # noqa: E402

serve = test_kube_jobs.serve  # the loopback API server fixture, shared
JOB_ID = "trainer-0123456789abcdef"
RUN = run_name(JOB_ID)
ENV = {"STAGETUNE_TRAINER_LAUNCHER": "kubernetes", "STAGETUNE_KUBE_IMAGE": "ghcr.io/stagetune/stagetune:1-cuda",
       "STAGETUNE_KUBE_PROFILE": "h200", "STAGETUNE_KUBE_NAMESPACE": "ml", "STAGETUNE_KUBE_SECRET": "creds",
       "STAGETUNE_KUBE_SERVICE_ACCOUNT": "st-workers", "STAGETUNE_TRAINER_GPUS": "8"}


def _cfg(processes: int, machines: int = 1) -> SimpleNamespace:
    return SimpleNamespace(num_processes=processes, num_machines=machines)


def test_which_runs_go_to_the_cluster() -> None:
    assert LauncherSettings.from_env({}) is None
    assert LauncherSettings.from_env({**ENV, "STAGETUNE_TRAINER_LAUNCHER": "local"}) is None
    settings = LauncherSettings.from_env(ENV)
    assert settings == LauncherSettings(image="ghcr.io/stagetune/stagetune:1-cuda", profile="h200", namespace="ml",
                                        secret="creds", service_account="st-workers", local_gpus=8)
    assert not settings.launches(_cfg(1))
    assert not settings.launches(_cfg(8))  # fits the trainer pod's own GPUs: local worker processes
    assert settings.launches(_cfg(16)) and settings.shape(_cfg(16)) == (1, 16)
    assert settings.launches(_cfg(16, machines=2)) and settings.shape(_cfg(16, machines=2)) == (2, 8)
    assert settings.launches(_cfg(2, machines=2))
    assert launcher_for(_cfg(16), ENV) == settings and launcher_for(_cfg(8), ENV) is None
    assert launcher_for(_cfg(16), {}) is None
    with pytest.raises(ConfigError, match="needs STAGETUNE_KUBE_IMAGE, STAGETUNE_KUBE_SECRET"):
        LauncherSettings.from_env({"STAGETUNE_TRAINER_LAUNCHER": "kubernetes", "STAGETUNE_KUBE_PROFILE": "h200"})
    with pytest.raises(ConfigError, match="unknown GPU profile 'a100'"):
        LauncherSettings.from_env({**ENV, "STAGETUNE_KUBE_PROFILE": "a100"})
    assert len(RUN) <= 63 and RUN.startswith("st-trainer-") and RUN == RUN.lower()
    assert (settings.run_kind, settings.trainjob_runtime) == ("auto", "torch-distributed")
    chosen = LauncherSettings.from_env({**ENV, "STAGETUNE_KUBE_RUN_KIND": "TrainJob",
                                        "STAGETUNE_KUBE_TRAINJOB_RUNTIME": "torch-rocm"})
    assert (chosen.run_kind, chosen.trainjob_runtime) == ("trainjob", "torch-rocm")
    with pytest.raises(ConfigError, match="RUN_KIND must be one of auto, job, trainjob, got 'pytorchjob'"):
        LauncherSettings.from_env({**ENV, "STAGETUNE_KUBE_RUN_KIND": "pytorchjob"})


def test_the_worker_spec_round_trips_through_the_store_and_a_file(tmp_path: Path, monkeypatch) -> None:
    store = LocalStore(tmp_path / "store")
    monkeypatch.setenv("STAGETUNE_STORE", str(tmp_path / "store"))
    request = trainer_pb2.StartTrainingRequest(request_id="r1", config_json='{"seed": 3}', manifest_id="m" * 16)
    from stagetune.trainer.worker import spec_bytes

    store.put_bytes(spec_key(JOB_ID), spec_bytes(request=request, store_url="s3://elsewhere", job_id=JOB_ID))
    got, opened, job_id, from_store = load_spec("store:" + spec_key(JOB_ID))
    assert (got, job_id, from_store) == (request, JOB_ID, True)
    assert opened.root == store.root  # the pod's own STAGETUNE_STORE, not the URL the trainer saw
    spec = write_spec(tmp_path / "spec.json", request=request, store_url=str(tmp_path / "store"), job_id=JOB_ID)
    got, opened, job_id, from_store = load_spec(str(spec))
    assert (got, job_id, from_store) == (request, JOB_ID, False)
    with pytest.raises(NotFoundError, match="no worker spec jobs/nope"):
        load_spec("store:jobs/nope/worker-spec.json")


class Ctx:
    """What run_on_cluster asks of the trainer job's context."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.job_id = JOB_ID
        self.request = trainer_pb2.StartTrainingRequest(request_id="r1", config_json="{}",
                                                        validation_endpoint="st-validation:50055")
        self.cancelled = threading.Event()
        self.logs: list[str] = []
        self.progressed: list[tuple[str, int, int]] = []

    def log(self, message: str, level: str = "info") -> None:
        self.logs.append(message)

    def progress(self, phase: str, done: int, total: int, unit: str = "") -> None:
        self.progressed.append((phase, done, total))


class RankZeroApi(FakeApi):
    """The loopback API server, plus rank 0 leaving its ending in the store at the `at`-th pod list."""

    def __init__(self, frames: list, store: LocalStore, ending: dict[str, Any] | None, at: int, **kw: Any) -> None:
        super().__init__(frames, run=RUN, **kw)
        self.store, self.ending, self.at = store, ending, at
        self.on_list: Any = None

    def handle(self, method: str, url: str, body: Any) -> tuple[int, Any]:
        answer = super().handle(method, url, body)
        if method == "GET" and url.startswith("/api/v1/namespaces/ml/pods"):
            if self.pod_lists == self.at and self.ending is not None:
                self.store.put_bytes(result_key(JOB_ID), json.dumps(self.ending).encode())
            if self.on_list is not None:
                self.on_list(self.pod_lists)
        return answer


def _frames() -> list[list[dict[str, Any]]]:
    def named(pod: dict[str, Any]) -> dict[str, Any]:
        pod["metadata"]["name"] = pod["metadata"]["name"].replace("run-1", RUN)
        return pod

    return [[named(_pod(0, "Pending", waiting="ContainerCreating")), named(_pod(1, "Pending"))],
            [named(_pod(0, "Running")), named(_pod(1, "Running"))],
            [named(_pod(0, "Succeeded", terminated="Completed")), named(_pod(1, "Succeeded", terminated="Completed"))]]


def _launch(serve, api: FakeApi, ctx: Ctx, monkeypatch, cfg: SimpleNamespace | None = None,
            **env: str) -> dict[str, str]:
    monkeypatch.setenv("STAGETUNE_API_TOKEN", "s3cr3t-7f4a")
    settings = LauncherSettings.from_env({**ENV, **env})
    return run_on_cluster(ctx, cfg or _cfg(16, machines=2), settings, serve(api), poll_s=0, unschedulable_limit=0)


def test_a_cluster_run_relays_its_pods_and_returns_rank_zeros_outputs(serve, tmp_path: Path, monkeypatch) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes(result_key(JOB_ID), b'{"outputs": {"steps": 99}}')  # an earlier attempt's: never read
    ctx = Ctx(store)
    api = RankZeroApi(_frames(), store, {"outputs": {"steps": 4, "lora": "pytorch_lora_weights.safetensors"}},
                      at=3, complete_after=3)
    outputs = _launch(serve, api, ctx, monkeypatch)
    assert outputs == {"steps": "4", "lora": "pytorch_lora_weights.safetensors"}

    (job,) = [body for m, p, _, body in api.requests if m == "POST" and p.endswith("/jobs")]
    for version in ("1.25.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(job, version, strict=True)
    assert job["metadata"]["name"] == RUN and job["spec"]["completions"] == 2
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == ENV["STAGETUNE_KUBE_IMAGE"] and pod["serviceAccountName"] == "st-workers"
    assert "--nproc-per-node=8" in container["command"] and "--nnodes=2" in container["command"]
    assert container["command"][-3:] == ["-m", "stagetune.trainer.worker", f"store:{spec_key(JOB_ID)}"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H200", "NVIDIA-H200-NVL"]} in (
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
            "matchExpressions"])
    env = {e["name"]: e for e in container["env"]}
    assert env["STAGETUNE_VALIDATION_ENDPOINT"]["value"] == "st-validation:50055"
    assert env["STAGETUNE_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "creds", "key": "api-token"}
    assert "s3cr3t-7f4a" not in json.dumps(job)  # the token itself never goes into the Job
    # The workers read the very request this job got, from the store.
    spec = json.loads(store.get_bytes(spec_key(JOB_ID)))
    import base64

    assert trainer_pb2.StartTrainingRequest.FromString(base64.b64decode(spec["request"])) == ctx.request
    assert f"node 0 ({RUN}-0-abcde): Pending, waiting: ContainerCreating" in ctx.logs
    assert f"node 1 ({RUN}-1-abcde): Succeeded, terminated: Completed (exit 0)" in ctx.logs
    assert ("training pods running", 2, 2) in ctx.progressed
    assert api.calls("DELETE") == [f"/apis/batch/v1/namespaces/ml/jobs/{RUN}", f"/api/v1/namespaces/ml/services/{RUN}"]


@pytest.mark.parametrize("ending, pods, error, says", [
    ({"error": ["ConfigError", "learning_rate must be positive", "learning_rate"]}, None, ConfigError,
     "learning_rate must be positive"),
    (None, None, TrainingJobError, "BackoffLimitExceeded"),
    (None, "OOMKilled", TrainingJobError, "OOMKilled"),
])
def test_a_failed_run_fails_with_the_pods_own_reason_and_is_removed(serve, tmp_path: Path, monkeypatch,
                                                                   ending, pods, error, says) -> None:
    store = LocalStore(tmp_path / "store")
    frames = _frames()[:2]
    if pods:
        frames[1][1]["status"] = {"phase": "Failed", "containerStatuses": [{
            "name": "worker", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}
    api = RankZeroApi(frames, store, ending, at=2, fail_after=2)
    with pytest.raises(error, match=says):
        _launch(serve, api, Ctx(store), monkeypatch)
    assert api.calls("DELETE") == [f"/apis/batch/v1/namespaces/ml/jobs/{RUN}", f"/api/v1/namespaces/ml/services/{RUN}"]


def test_cancel_stops_following_and_removes_the_run(serve, tmp_path: Path, monkeypatch) -> None:
    store = LocalStore(tmp_path / "store")
    ctx = Ctx(store)
    api = RankZeroApi([_frames()[1]], store, None, at=0)  # running for ever
    api.on_list = lambda lists: ctx.cancelled.set() if lists >= 3 else None
    with pytest.raises(JobCancelled):
        _launch(serve, api, ctx, monkeypatch)
    assert api.calls("DELETE") == [f"/apis/batch/v1/namespaces/ml/jobs/{RUN}", f"/api/v1/namespaces/ml/services/{RUN}"]


def test_the_trainer_job_hands_a_big_run_to_the_launcher(tmp_path: Path, monkeypatch) -> None:
    """train_job's choice: the launcher for a run bigger than the pod, local processes without the launcher."""
    import stagetune.trainer.kube.launcher as launcher
    import stagetune.trainer.workers as workers
    from stagetune.trainer.service import train_job

    called: list[str] = []
    monkeypatch.setattr(launcher, "run_on_cluster", lambda ctx, cfg, settings: called.append(
        f"cluster {settings.shape(cfg)}") or {"steps": "1"})
    monkeypatch.setattr(workers, "run_workers", lambda ctx, cfg: called.append("local") or {"steps": "1"})
    config = {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": "org/model",
              "output_dir": str(tmp_path / "out"), "num_processes": 16, "num_machines": 2,
              "main_process_ip": "10.0.0.1", "main_process_port": 29500}
    ctx = SimpleNamespace(request=trainer_pb2.StartTrainingRequest(config_json=json.dumps(config)))
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert train_job(ctx) == {"steps": "1"}
    monkeypatch.setenv("STAGETUNE_TRAINER_LAUNCHER", "")
    train_job(ctx)
    assert called == ["cluster (2, 8)", "local"]


def _kubeflow_frames() -> list[list[dict[str, Any]]]:
    frames = _frames()
    for frame in frames:
        for pod in frame:
            rank = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
            pod["metadata"]["name"] = f"{RUN}-node-0-{rank}-xyz"
    return frames


def test_where_kubeflow_trainer_is_installed_a_run_is_a_train_job(serve, tmp_path: Path, monkeypatch) -> None:
    from test_kube_jobs import KUBEFLOW, _kubeflow_round_trip

    store = LocalStore(tmp_path / "store")
    ctx = Ctx(store)
    api = RankZeroApi(_kubeflow_frames(), store, {"outputs": {"steps": 4}}, at=3, complete_after=3, kubeflow=True)
    assert _launch(serve, api, ctx, monkeypatch) == {"steps": "4"}
    assert api.calls("POST") == [f"/apis/{KUBEFLOW}/namespaces/ml/trainjobs"]
    (train_job,) = [body for m, _, _, body in api.requests if m == "POST"]
    assert _kubeflow_round_trip(train_job) == train_job
    trainer = train_job["spec"]["trainer"]
    assert trainer["command"] == ["torchrun", "-m", "stagetune.trainer.worker", f"store:{spec_key(JOB_ID)}"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (2, 8, ENV["STAGETUNE_KUBE_IMAGE"])
    assert train_job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert "s3cr3t-7f4a" not in json.dumps(train_job)
    assert any("as a Kubeflow TrainJob on runtime torch-distributed: 2 pod(s) x 8 process(es)" in line
               for line in ctx.logs)
    assert f"node 1 ({RUN}-node-0-1-xyz): Succeeded, terminated: Completed (exit 0)" in ctx.logs
    assert api.calls("DELETE") == [f"/apis/{KUBEFLOW}/namespaces/ml/trainjobs/{RUN}"]

    # The operator asked for plain Jobs: Kubeflow is there, but not used.
    api = RankZeroApi(_frames(), store, {"outputs": {"steps": 4}}, at=3, complete_after=3, kubeflow=True)
    assert _launch(serve, api, Ctx(store), monkeypatch, STAGETUNE_KUBE_RUN_KIND="job") == {"steps": "4"}
    assert api.calls("POST") == ["/api/v1/namespaces/ml/services", "/apis/batch/v1/namespaces/ml/jobs"]


def test_insisting_on_a_train_job_without_kubeflow_is_refused_before_anything_starts(serve, tmp_path: Path,
                                                                                     monkeypatch) -> None:
    store = LocalStore(tmp_path / "store")
    api = RankZeroApi(_frames(), store, None, at=0)
    with pytest.raises(ConfigError, match="serves no TrainJobs \\(trainer.kubeflow.org/v1alpha1\\): install Kubeflow"):
        _launch(serve, api, Ctx(store), monkeypatch, STAGETUNE_KUBE_RUN_KIND="trainjob")
    assert api.calls("POST") == [] and api.calls("DELETE") == []
