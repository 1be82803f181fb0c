"""The trainer's Kubernetes launcher: when a run goes to the cluster, the worker spec through the store, and a
run driven against the loopback API server of test_kube_jobs.py (pods replayed as the API server reports them).

Not tested (no cluster): torchrun and the workers inside real pods; the worker's store-spec path is tested here
by reading back what the launcher wrote, and the worker's training by tests/test_distributed.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
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
    own = LauncherSettings.from_env({**ENV, "STAGETUNE_KUBE_TRAINJOB_RUNTIME": "TrainingRuntime/st-stagetune-training"})
    assert (own.trainjob_runtime_kind, own.trainjob_runtime) == ("TrainingRuntime", "st-stagetune-training")
    assert chosen.trainjob_runtime_kind == "ClusterTrainingRuntime"
    with pytest.raises(ConfigError, match="KIND one of TrainingRuntime, ClusterTrainingRuntime, got 'Runtime/x'"):
        LauncherSettings.from_env({**ENV, "STAGETUNE_KUBE_TRAINJOB_RUNTIME": "Runtime/x"})
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


def test_rank_zeros_events_reach_the_launcher_through_the_store_in_batches(tmp_path: Path) -> None:
    """A step's progress and metrics are batched (one store write per interval, never per step); a store that
    fails for a while loses nothing, even when a write landed but was reported failed; a reader gets each
    event once, in order, also when the store fails part-way through its read; a restarted rank 0 goes on
    after what is there; a rerun starts clean."""
    from stagetune.core.errors import StoreUnavailableError
    from stagetune.trainer.worker import StoreEventLog, StoreEventReader, events_key

    store = LocalStore(tmp_path / "store")
    now = [0.0]
    log = StoreEventLog(store, JOB_ID, interval=5.0, clock=lambda: now[0], timer=False)
    reader = StoreEventReader(store, JOB_ID)
    for step in (1, 2, 3):
        log.add("progress", ["training", step, 10, "steps"])
    assert reader.read() == [] and not store.exists(events_key(JOB_ID, 0))
    now[0] = 5.0
    log.add("metric", ["loss", 0.5, 3])
    assert [values[1] for _, values in reader.read()] == [1, 2, 3, 0.5]
    assert reader.read() == []

    real_put, real_get = store.put_bytes, store.get_bytes
    failing = {"puts": 2, "landed": False}

    def flaky_put(key: str, data: bytes, *, durable: bool = True) -> None:
        if failing["puts"]:
            failing["puts"] -= 1
            if failing["landed"]:  # the write reached the store, its answer did not
                real_put(key, data, durable=durable)
            failing["landed"] = True
            raise StoreUnavailableError("S3 endpoint down", field="store")
        real_put(key, data, durable=durable)

    store.put_bytes = flaky_put  # type: ignore[method-assign]
    now[0] += 5.0
    log.add("progress", ["training", 4, 10, "steps"])  # fails, not landed
    now[0] += 5.0
    log.add("progress", ["training", 5, 10, "steps"])  # the same batch again: lands, reported failed
    got = reader.read()
    assert got == [("progress", ["training", 4, 10, "steps"])]  # a reader may see a batch that "failed"
    log.add("log", ["saved checkpoint-5", "info"])
    log.flush()  # retries that batch unchanged, then the rest under the next number: nothing twice, none lost
    assert reader.read() == [("progress", ["training", 5, 10, "steps"]), ("log", ["saved checkpoint-5", "info"])]
    store.put_bytes = real_put  # type: ignore[method-assign]

    restarted = StoreEventLog(store, JOB_ID, interval=5.0, clock=lambda: now[0], timer=False)
    restarted.add("log", ["rank 0 again", "info"])
    restarted.flush()
    calls = {"n": 0}

    def flaky_get(key: str) -> bytes:
        calls["n"] += 1
        if calls["n"] == 2:
            raise StoreUnavailableError("S3 endpoint down", field="store")
        return real_get(key)

    restarted.add("log", ["and on", "info"])
    restarted.flush()
    store.get_bytes = flaky_get  # type: ignore[method-assign]
    assert reader.read() == [("log", ["rank 0 again", "info"])]  # the second object failed: kept for later
    assert reader.read() == [("log", ["and on", "info"])]
    store.get_bytes = real_get  # type: ignore[method-assign]

    StoreEventReader(store, JOB_ID).clear()
    assert StoreEventReader(store, JOB_ID).read() == []


def test_quiet_spells_are_flushed_by_the_timer(tmp_path: Path) -> None:
    """Rank 0 says "loading model" and then nothing for minutes: its line still reaches the launcher."""
    import time

    from stagetune.trainer.worker import StoreEventLog, StoreEventReader

    store = LocalStore(tmp_path / "store")
    log = StoreEventLog(store, JOB_ID, interval=0.1)
    log.add("log", ["loading model", "info"])
    deadline = time.monotonic() + 10
    reader = StoreEventReader(store, JOB_ID)
    got: list = []
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
        got = reader.read()
    log.close()
    assert got == [("log", ["loading model", "info"])]


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
    assert any("as a Kubeflow TrainJob on ClusterTrainingRuntime torch-distributed: 2 pod(s) x 8 process(es)" in line
               for line in ctx.logs)
    assert f"node 1 ({RUN}-node-0-1-xyz): Succeeded, terminated: Completed (exit 0)" in ctx.logs
    assert api.calls("DELETE") == [f"/apis/{KUBEFLOW}/namespaces/ml/trainjobs/{RUN}"]

    # The chart's own runtime (restartPolicy Never, backoffLimit 0), in the TrainJob's namespace.
    api = RankZeroApi(_kubeflow_frames(), store, {"outputs": {"steps": 4}}, at=3, complete_after=3, kubeflow=True)
    _launch(serve, api, Ctx(store), monkeypatch,
            STAGETUNE_KUBE_TRAINJOB_RUNTIME="TrainingRuntime/st-stagetune-training")
    (train_job,) = [body for m, _, _, body in api.requests if m == "POST"]
    assert train_job["spec"]["runtimeRef"] == {"name": "st-stagetune-training", "apiGroup": "trainer.kubeflow.org",
                                               "kind": "TrainingRuntime"}
    assert _kubeflow_round_trip(train_job) == train_job

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


# -- a whole cluster run on a loopback "kubelet" ------------------------------------------------------------

class LoopbackKubelet(FakeApi):
    """The API server and one node: a created Job's single pod is its container's command, run here as the
    kubelet would (the container's environment, `$(VAR)` expanded, the Secret's keys filled in), with node 0's
    DNS name pointed at loopback. Pod and Job states follow the process."""

    def __init__(self, scratch: Path) -> None:
        super().__init__([[]])
        self.scratch = scratch
        self.process: subprocess.Popen[str] | None = None
        self.job: dict[str, Any] | None = None

    def handle(self, method: str, url: str, body: Any) -> tuple[int, Any]:
        path = url.split("?")[0]
        if method == "POST" and path == "/apis/batch/v1/namespaces/ml/jobs":
            self.job, self.run = body, body["metadata"]["name"]
            self.process = self._start(body)
        if method == "GET" and path == "/api/v1/namespaces/ml/pods":
            self.requests.append((method, path, {}, body))
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [self._pod()]}
        if method == "GET" and path == f"/apis/batch/v1/namespaces/ml/jobs/{self.run}":
            code = self.process.poll() if self.process else None
            conditions = [] if code is None else [{"type": "Complete" if code == 0 else "Failed", "status": "True",
                                                   "reason": "Completed" if code == 0 else "BackoffLimitExceeded",
                                                   "message": f"exit {code}"}]
            return 200, {"kind": "Job", "apiVersion": "batch/v1", "metadata": {"name": self.run},
                         "status": {"conditions": conditions}}
        return super().handle(method, url, body)

    def _pod(self) -> dict[str, Any]:
        code = self.process.poll() if self.process else None
        phase = "Running" if code is None else "Succeeded" if code == 0 else "Failed"
        pod = _pod(0, phase, terminated=None if code is None else "Completed" if code == 0 else "Error")
        pod["metadata"]["name"] = f"{self.run}-0-kubelet"
        return pod

    def _start(self, job: dict[str, Any]) -> subprocess.Popen[str]:
        import os
        import re

        from stagetune.trainer.distributed import free_port

        (container,) = job["spec"]["template"]["spec"]["containers"]
        env = dict(os.environ)
        for variable in container["env"]:
            if "value" in variable:
                env[variable["name"]] = variable["value"].replace("/cache", str(self.scratch))
            elif "secretKeyRef" in variable["valueFrom"]:
                env[variable["name"]] = "from-the-secret"
            else:  # the completion index, from the pod's annotation
                env[variable["name"]] = "0"
        port = free_port()
        command = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], part) for part in container["command"]]
        command = [re.sub(r"^--rdzv-endpoint=.*$", f"--rdzv-endpoint=127.0.0.1:{port}", part) for part in command]
        assert command[0] == "torchrun"
        command = [sys.executable, "-m", "torch.distributed.run", *command[1:]]
        self.log = open(self.scratch / "pod.log", "w")  # noqa: SIM115 - closed by the test
        return subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)


def test_a_cluster_run_trains_in_its_pod_and_reports_its_steps_through_the_store(
        serve, tmp_path: Path, tiny_sd3_path: Path, monkeypatch) -> None:
    """`num_processes: 2` on a trainer pod without GPUs goes to the cluster: the Job's command (torchrun and
    the worker, as built) runs on the loopback kubelet, trains from the spec in the store, and rank 0's steps,
    loss and log lines reach the trainer job's own events through the store; its outputs are the run's."""
    import functools

    from test_distributed import LORA, _configs
    from test_end_to_end import make_dataset

    import stagetune.trainer.kube.launcher as launcher
    from stagetune.core.store import open_store
    from stagetune.pipeline import run_training, start_embedded

    for name, value in {**ENV, "STAGETUNE_KUBE_PROFILE": "cpu", "STAGETUNE_TRAINER_GPUS": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("STAGETUNE_API_TOKEN", raising=False)
    kubelet = LoopbackKubelet(tmp_path)
    api_client = serve(kubelet)
    monkeypatch.setattr(launcher, "_in_cluster_client", lambda: api_client)
    monkeypatch.setattr(launcher, "run_on_cluster", functools.partial(launcher.run_on_cluster, poll_s=0.2))
    make_dataset(tmp_path / "data")
    config = _configs(tmp_path / "run", tiny_sd3_path, tmp_path / "data", processes=2, batch=2, steps=3,
                      checkpointing_steps=2)
    servers = start_embedded(open_store(str(tmp_path / "store")))
    events: list[tuple[str, Any]] = []
    try:
        run = run_training(config, {name: s.address for name, s in servers.items()},
                           on_event=lambda phase, event: events.append((phase, event)))
    finally:
        for server in servers.values():
            server.stop(0)
        if kubelet.process is not None and kubelet.process.poll() is None:
            kubelet.process.kill()
        if kubelet.process is not None:
            kubelet.log.close()
    log = (tmp_path / "pod.log").read_text()
    assert kubelet.process.returncode == 0, log[-3000:]
    assert run.phase("trainer").outputs["steps"] == "3"
    assert (tmp_path / "run" / "output" / LORA).exists() and (tmp_path / "run" / "output" / "checkpoint-2").is_dir()
    trainer = [event for phase, event in events if phase == "trainer"]
    steps = [(e.progress.done, e.progress.total) for e in trainer
             if e.WhichOneof("body") == "progress" and e.progress.phase == "training"]
    assert steps and steps[-1] == (3, 3), steps  # rank 0's steps, relayed from the pod through the store
    losses = [e.metric for e in trainer if e.WhichOneof("body") == "metric" and e.metric.name == "loss"]
    assert [m.step for m in losses] == [1, 2, 3]
    lines = [e.log.message for e in trainer if e.WhichOneof("body") == "log"]
    assert any("as an Indexed Job" in line for line in lines)
    assert any(f"node 0 ({kubelet.run}-0-kubelet): Succeeded" in line for line in lines)
    assert kubelet.job["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["torchrun", "--nnodes=1"]
    assert kubelet.calls("DELETE") == [f"/apis/batch/v1/namespaces/ml/jobs/{kubelet.run}",
                                       f"/api/v1/namespaces/ml/services/{kubelet.run}"]
