"""Training runs as Kubernetes objects: the Indexed Job and headless Service validated against the Kubernetes
schemas, and the client driven against a real HTTP server on loopback that answers the API paths it uses.

Not tested here (no cluster): the API server's own behaviour (scheduling, the Job controller's index
annotation and pod names, DNS for `<run>-<i>.<run>`) and torchrun's rendezvous; the fake server replays
pod states as the API server reports them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

kubernetes = pytest.importorskip("kubernetes")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from stagetune.trainer.kube.client import TrainingJobError, has_trainjobs, run_training_job  # noqa: E402
from stagetune.trainer.kube.objects import (  # noqa: E402
    RDZV_PORT,
    RunPod,
    image_for,
    train_job,
    training_objects,
)
from stagetune.trainer.kube.profiles import PROFILES, profile  # noqa: E402

KUBEFLOW = "trainer.kubeflow.org/v1alpha1"
WORKER = ["-m", "stagetune.trainer.worker", "store:jobs/j1/worker-spec.json"]


def _pod_parts(name: str, gpus: int, **options: Any) -> RunPod:
    return RunPod(profile=profile(name), gpus_per_node=gpus, store_url="s3://b?endpoint=http://s3:8333",
                  secret_name="creds", **options)


def _objects(name: str = "h100", nodes: int = 2, gpus: int = 8) -> tuple[dict[str, Any], dict[str, Any]]:
    return training_objects(run="run-1", namespace="ml", nodes=nodes, worker=WORKER,
                            image=image_for("ghcr.io/stagetune/stagetune", "0.1.0", profile(name)),
                            pod=_pod_parts(name, gpus))


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_objects_are_valid_and_pinned(name: str) -> None:
    p = PROFILES[name]
    job, service = _objects(name, nodes=3, gpus=0 if p.resource is None else 4)
    for obj in (job, service):
        for version in ("1.25.0", kubernetes_validate.latest_version()):
            kubernetes_validate.validate(obj, version, strict=True)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "run-1"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:2] == ["torchrun", "--nnodes=3"] and command[-len(WORKER):] == WORKER
    assert f"--rdzv-endpoint=run-1-0.run-1:{RDZV_PORT}" in command and "--node-rank=$(JOB_COMPLETION_INDEX)" in command
    env = {e["name"]: e for e in container["env"]}
    assert "job-completion-index" in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert env["STAGETUNE_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "creds", "key": "s3-secret-key"}
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": p.node_expressions()}]
    assert pod.get("tolerations", []) == [dict(t) for t in p.tolerations]
    assert container["image"].endswith(f"-{p.image}")
    if p.resource:
        assert container["resources"]["limits"][p.resource] == "4"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in pod["volumes"]


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="need >= 1 node"):
        _objects("b200", nodes=0)
    with pytest.raises(ValueError, match="GPU per node"):
        _objects("b200", gpus=0)
    with pytest.raises(ValueError, match="unknown GPU profile 'a100'"):
        profile("a100")


# -- a loopback API server ------------------------------------------------------------------------------

def _pod(rank: int, phase: str, *, waiting: str | None = None, terminated: str | None = None,
         unschedulable: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if waiting or terminated:
        state = ({"waiting": {"reason": waiting, "message": "back-off pulling image"}} if waiting
                 else {"terminated": {"reason": terminated, "exitCode": 137 if terminated == "OOMKilled" else 0}})
        status["containerStatuses"] = [{"name": "worker", "image": "ghcr.io/x:1-cuda", "imageID": "", "ready": False,
                                        "restartCount": 0, "state": state}]
    elif phase == "Running":
        status["containerStatuses"] = [{"name": "worker", "image": "ghcr.io/x:1-cuda", "imageID": "", "ready": True,
                                        "restartCount": 0, "state": {"running": {}}}]
    if unschedulable:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]
    return {"metadata": {"name": f"run-1-{rank}-abcde", "namespace": "ml",
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(rank)}},
            "spec": {"containers": [{"name": "worker"}]}, "status": status}


class FakeApi:
    """Answers the paths the client uses; each pod list request returns the next frame of `frames`."""

    def __init__(self, frames: list[list[dict[str, Any]]], complete_after: int | None = None,
                 refuse_job: bool = False, run: str = "run-1", fail_after: int | None = None,
                 kubeflow: bool = False, refuse_trainjob: str | None = None, create_status: int | None = None) -> None:
        self.frames, self.complete_after, self.refuse_job = frames, complete_after, refuse_job
        self.run, self.fail_after = run, fail_after
        self.kubeflow, self.refuse_trainjob = kubeflow, refuse_trainjob  # Kubeflow Trainer installed; its webhook
        self.create_status = create_status  # the TrainJob create answers this (after storing the object)
        self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []
        self.pod_lists = 0

    def handle(self, method: str, url: str, body: Any) -> tuple[int, Any]:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.requests.append((method, parts.path, query, body))
        path = parts.path
        if method == "POST" and path == "/api/v1/namespaces/ml/services":
            return 201, body
        if method == "POST" and path == "/apis/batch/v1/namespaces/ml/jobs":
            if self.refuse_job:
                return 409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
                             "code": 409, "message": 'jobs.batch "run-1" already exists'}
            return 201, body
        if method == "GET" and path == "/api/v1/namespaces/ml/pods":
            frame = self.frames[min(self.pod_lists, len(self.frames) - 1)]
            self.pod_lists += 1
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": frame}
        if method == "GET" and path == f"/apis/batch/v1/namespaces/ml/jobs/{self.run}":
            return 200, {"kind": "Job", "apiVersion": "batch/v1", "metadata": {"name": self.run},
                         "status": {"conditions": self._conditions("BackoffLimitExceeded")}}
        trainjobs = f"/apis/{KUBEFLOW}/namespaces/ml/trainjobs"
        if self.kubeflow and method == "GET" and path == f"/apis/{KUBEFLOW}":
            return 200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": KUBEFLOW, "resources": [
                {"name": name, "singularName": name[:-1], "namespaced": namespaced, "kind": kind,
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                for name, namespaced, kind in (("trainjobs", True, "TrainJob"),
                                               ("trainingruntimes", True, "TrainingRuntime"),
                                               ("clustertrainingruntimes", False, "ClusterTrainingRuntime"))]}
        if self.kubeflow and method == "POST" and path == trainjobs:
            if self.create_status:
                return self.create_status, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                            "code": self.create_status, "message": "etcd leader changed"}
            if self.refuse_trainjob:
                return 422, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid",
                             "code": 422, "message": self.refuse_trainjob}
            return 201, body
        if self.kubeflow and method == "GET" and path == f"{trainjobs}/{self.run}":
            return 200, {"apiVersion": KUBEFLOW, "kind": "TrainJob", "metadata": {"name": self.run},
                         "status": {"conditions": self._conditions("JobSetFailed")}}
        if self.kubeflow and method == "DELETE" and path == f"{trainjobs}/{self.run}":
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        if method == "DELETE" and path == f"/apis/batch/v1/namespaces/ml/jobs/{self.run}":
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        if method == "DELETE" and path == f"/api/v1/namespaces/ml/services/{self.run}":
            return 200, {"kind": "Service", "apiVersion": "v1", "metadata": {"name": self.run}}  # as the API does
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"}

    def _conditions(self, failed_reason: str) -> list[dict[str, str]]:
        done = self.complete_after is not None and self.pod_lists >= self.complete_after
        failed = self.fail_after is not None and self.pod_lists >= self.fail_after
        return ([{"type": "Complete", "status": "True", "reason": "Completed", "message": ""}] if done else
                [{"type": "Failed", "status": "True", "reason": failed_reason,
                  "message": "Job has reached the specified backoff limit"}] if failed else [])

    def calls(self, method: str) -> list[str]:
        return [path for m, path, _, _ in self.requests if m == method]


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def start(api: FakeApi) -> Any:
        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                code, reply = api.handle(self.command, self.path, body)
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        config = kubernetes.client.Configuration(host=f"http://127.0.0.1:{server.server_port}")
        return kubernetes.client.ApiClient(config)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _run(client: Any, **options: Any) -> Iterator[Any]:
    return run_training_job(client, run="run-1", namespace="ml", profile="b200", nodes=2, gpus_per_node=8,
                            image="ghcr.io/stagetune/stagetune:0.1.0-cuda", worker=WORKER,
                            store_url="s3://b?endpoint=http://s3:8333", secret_name="creds", poll_s=0, **options)


def test_a_run_streams_pod_states_and_cleans_up(serve) -> None:
    frames = [[_pod(0, "Pending", unschedulable=True), _pod(1, "Pending", waiting="ContainerCreating")],
              [_pod(0, "Running"), _pod(1, "Running")],
              [_pod(0, "Running"), _pod(1, "Running")],
              [_pod(0, "Succeeded", terminated="Completed"), _pod(1, "Succeeded", terminated="Completed")]]
    api = FakeApi(frames, complete_after=4)
    events = list(_run(serve(api)))
    assert [(e.node_rank, e.phase, e.detail) for e in events] == [
        (0, "Pending", "unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."),
        (1, "Pending", "waiting: ContainerCreating"),
        (0, "Running", "running"), (1, "Running", "running"),
        (0, "Succeeded", "terminated: Completed (exit 0)"), (1, "Succeeded", "terminated: Completed (exit 0)"),
    ]
    assert api.calls("POST") == ["/api/v1/namespaces/ml/services", "/apis/batch/v1/namespaces/ml/jobs"]
    created = [body for m, p, _, body in api.requests if m == "POST" and p.endswith("/jobs")][0]
    assert created["spec"]["completionMode"] == "Indexed" and created["spec"]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["nvidia.com/gpu"] == "8"
    pod_queries = [q for m, p, q, _ in api.requests if p.endswith("/pods")]
    assert pod_queries[0]["labelSelector"] == ["stagetune.io/training-run=run-1"]
    assert api.calls("DELETE") == ["/apis/batch/v1/namespaces/ml/jobs/run-1", "/api/v1/namespaces/ml/services/run-1"]
    deleted = [(q, body) for m, p, q, body in api.requests if m == "DELETE" and p.endswith("/jobs/run-1")][0]
    # The pods go with the Job (the client sends the policy as a query parameter or in DeleteOptions).
    assert deleted[0].get("propagationPolicy") == ["Background"] or (deleted[1] or {}).get(
        "propagationPolicy") == "Background"


@pytest.mark.parametrize("pod, reason, says", [
    (_pod(1, "Failed", terminated="OOMKilled"), "OOMKilled", "more memory than its limit (OOMKilled)"),
    (_pod(1, "Pending", waiting="ImagePullBackOff"), "ImagePull", "cannot pull its image ghcr.io/x:1-cuda"),
    (_pod(1, "Pending", waiting="ErrImagePull"), "ImagePull", "ErrImagePull"),
    (_pod(1, "Pending", unschedulable=True), "Unschedulable", "Insufficient nvidia.com/gpu"),
])
def test_pod_failures_become_clear_errors(serve, pod: dict[str, Any], reason: str, says: str) -> None:
    api = FakeApi([[_pod(0, "Running"), pod]])
    with pytest.raises(TrainingJobError) as caught:
        list(_run(serve(api), unschedulable_limit=0))
    assert caught.value.reason == reason and says in str(caught.value)
    assert api.calls("DELETE") == ["/apis/batch/v1/namespaces/ml/jobs/run-1", "/api/v1/namespaces/ml/services/run-1"]


def test_unschedulable_is_waited_out_for_a_while(serve) -> None:
    """An autoscaler may be adding the node: Unschedulable is an error only after the limit."""
    frames = [[_pod(0, "Pending", unschedulable=True)], [_pod(0, "Running")]]
    api = FakeApi(frames, complete_after=2)
    assert [e.phase for e in _run(serve(api), unschedulable_limit=600)] == ["Pending", "Running"]


def test_a_refused_job_removes_the_service_it_created(serve) -> None:
    """A Job of that name exists already (an earlier attempt's): said plainly, and the Service made for this
    attempt is removed; the other run's Job is not touched."""
    api = FakeApi([[]], refuse_job=True)
    with pytest.raises(TrainingJobError, match="a training run named run-1 already exists in namespace ml") as caught:
        list(_run(serve(api)))
    assert caught.value.reason == "Refused"
    assert api.calls("DELETE") == ["/api/v1/namespaces/ml/services/run-1"]


def test_a_container_restarted_in_place_fails_the_run(serve) -> None:
    """A runtime with restartPolicy OnFailure (Kubeflow's stock one) restarts a failed rank in place; the pod
    stays Running, so the restart itself is the failure, said with the exit code."""
    restarted = _kubeflow_pod(1, "Running")
    restarted["status"]["containerStatuses"][0].update(
        restartCount=1, lastState={"terminated": {"reason": "Error", "exitCode": 1}})
    api = FakeApi([[_kubeflow_pod(0, "Running"), restarted]], kubeflow=True)
    with pytest.raises(TrainingJobError, match="exited with code 1 \\(Error\\) and was restarted in place") as caught:
        list(_run_train_job(serve(api)))
    assert caught.value.reason == "Failed"
    assert api.calls("DELETE") == [f"/apis/{KUBEFLOW}/namespaces/ml/trainjobs/run-1"]


def test_a_create_whose_answer_was_lost_is_cleaned_up(serve) -> None:
    """A 5xx (or a timeout) on create may still have made the object: it is deleted before the error is raised."""
    api = FakeApi([[]], kubeflow=True, create_status=503)
    with pytest.raises(kubernetes.client.exceptions.ApiException) as caught:
        list(_run_train_job(serve(api)))
    assert caught.value.status == 503
    assert api.calls("DELETE") == [f"/apis/{KUBEFLOW}/namespaces/ml/trainjobs/run-1"]


# -- Kubeflow Trainer's TrainJob ---------------------------------------------------------------------------

def _train_job(name: str = "h100", nodes: int = 2, gpus: int = 8, **options: Any) -> dict[str, Any]:
    return train_job(run="run-1", namespace="ml", nodes=nodes, worker=WORKER,
                     image=image_for("ghcr.io/stagetune/stagetune", "0.1.0", profile(name)),
                     pod=_pod_parts(name, gpus, **options))


def _kubeflow_round_trip(obj: dict[str, Any]) -> dict[str, Any]:
    """The TrainJob as Kubeflow Trainer's own API models (v2.3) read it back: a field the API lacks is
    dropped and a wrong type or missing required field raises, so equality means the object is valid."""
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    return TrainerV1alpha1TrainJob.from_dict(obj).to_dict()


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_train_job_is_valid_kubeflow_and_runs_the_same_pods(name: str) -> None:
    p = PROFILES[name]
    gpus = 0 if p.resource is None else 4
    options = {"secret_env": {"STAGETUNE_API_TOKEN": "api-token"}, "s3_ca": ("ca", "bundle.pem"),
               "service_account": "st-runs"}
    obj = _train_job(name, nodes=3, gpus=gpus, **options)
    assert _kubeflow_round_trip(obj) == obj
    spec = obj["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}
    trainer = spec["trainer"]
    # The runtime's torch plugin sets torchrun's PET_* variables; setting one ourselves is refused by its webhook.
    assert trainer["command"] == ["torchrun", *WORKER]
    assert not [e for e in trainer["env"] if e["name"].startswith("PET_")]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, max(1, gpus))
    (patch,) = spec["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"
    template = replicated["template"]["spec"]["template"]
    pod_patch = template["spec"]

    # The same pods as the operator-free Job's: labels (followed and network-policed by them), placement,
    # security, volumes, environment and resources.
    job, _ = training_objects(run="run-1", namespace="ml", nodes=3, worker=WORKER, image=trainer["image"],
                              pod=_pod_parts(name, gpus, **options))
    job_pod = job["spec"]["template"]
    (worker,) = job_pod["spec"]["containers"]
    (container_patch,) = pod_patch["containers"]
    assert template["metadata"]["labels"] == job_pod["metadata"]["labels"] == obj["metadata"]["labels"]
    for key in ("affinity", "securityContext", "volumes", "serviceAccountName", "terminationGracePeriodSeconds"):
        assert pod_patch[key] == job_pod["spec"][key], key
    assert pod_patch.get("tolerations") == job_pod["spec"].get("tolerations")
    assert container_patch == {"name": "node", "volumeMounts": worker["volumeMounts"],
                               "securityContext": worker["securityContext"]}
    assert trainer["env"] == [e for e in worker["env"] if e["name"] != "JOB_COMPLETION_INDEX"]
    assert trainer["resourcesPerNode"] == worker["resources"]
    if p.resource:
        assert trainer["resourcesPerNode"]["limits"][p.resource] == "4"
    assert {"name": "s3-ca", "mountPath": "/etc/stagetune/s3-ca", "readOnly": True} in container_patch["volumeMounts"]
    assert {"name": "STAGETUNE_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "api-token"}}} \
        in trainer["env"]


def test_the_round_trip_catches_what_kubeflow_would_not_take() -> None:
    """The check above can fail: a pod field the TrainJob's patch does not allow, or a wrong type."""
    obj = _train_job()
    pod_patch = obj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    pod_patch["automountServiceAccountToken"] = False  # a Job's pod may say it; a runtime patch may not
    assert _kubeflow_round_trip(obj) != obj
    wrong = _train_job()
    wrong["spec"]["trainer"]["numNodes"] = "3"
    with pytest.raises(ValueError, match="numNodes|num_nodes"):
        _kubeflow_round_trip(wrong)


def test_discovery_says_whether_kubeflow_trainer_is_installed(serve) -> None:
    assert has_trainjobs(serve(FakeApi([[]], kubeflow=True))) is True
    assert has_trainjobs(serve(FakeApi([[]]))) is False


def _kubeflow_pod(rank: int, phase: str, **state: Any) -> dict[str, Any]:
    """A pod as the TrainJob's JobSet names it (<run>-node-0-<i>-<hash>), with the completion index."""
    pod = _pod(rank, phase, **state)
    pod["metadata"]["name"] = f"run-1-node-0-{rank}-xyz"
    return pod


def _run_train_job(client: Any, **options: Any) -> Iterator[Any]:
    return run_training_job(client, run="run-1", namespace="ml", profile="mi300x", nodes=2, gpus_per_node=8,
                            image="ghcr.io/stagetune/stagetune:0.1.0-rocm", worker=WORKER,
                            store_url="s3://b?endpoint=http://s3:8333", secret_name="creds", poll_s=0,
                            trainjob_runtime="torch-distributed", **options)


def test_a_train_job_streams_pod_states_and_is_removed(serve) -> None:
    frames = [[_kubeflow_pod(0, "Pending", waiting="ContainerCreating")],
              [_kubeflow_pod(0, "Running"), _kubeflow_pod(1, "Running")],
              [_kubeflow_pod(0, "Succeeded", terminated="Completed"),
               _kubeflow_pod(1, "Succeeded", terminated="Completed")]]
    api = FakeApi(frames, complete_after=3, kubeflow=True)
    events = list(_run_train_job(serve(api)))
    assert [(e.pod, e.node_rank, e.phase) for e in events] == [
        ("run-1-node-0-0-xyz", 0, "Pending"), ("run-1-node-0-0-xyz", 0, "Running"),
        ("run-1-node-0-1-xyz", 1, "Running"), ("run-1-node-0-0-xyz", 0, "Succeeded"),
        ("run-1-node-0-1-xyz", 1, "Succeeded")]
    assert api.calls("POST") == [f"/apis/{KUBEFLOW}/namespaces/ml/trainjobs"]  # no Job, no Service of our own
    (created,) = [body for m, _, _, body in api.requests if m == "POST"]
    assert _kubeflow_round_trip(created) == created
    assert created["spec"]["trainer"]["resourcesPerNode"]["limits"]["amd.com/gpu"] == "8"
    pod_queries = [q for m, p, q, _ in api.requests if p.endswith("/pods")]
    assert pod_queries[0]["labelSelector"] == ["stagetune.io/training-run=run-1"]
    assert api.calls("DELETE") == [f"/apis/{KUBEFLOW}/namespaces/ml/trainjobs/run-1"]


def test_a_failed_or_refused_train_job_is_a_clear_error(serve) -> None:
    api = FakeApi([[_kubeflow_pod(0, "Running")]], fail_after=1, kubeflow=True)
    with pytest.raises(TrainingJobError, match="run-1 \\(TrainJob\\) failed: JobSetFailed") as caught:
        list(_run_train_job(serve(api)))
    assert caught.value.reason == "Failed"
    assert api.calls("DELETE") == [f"/apis/{KUBEFLOW}/namespaces/ml/trainjobs/run-1"]

    words = 'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request: ' \
            'ClusterTrainingRuntime.trainer.kubeflow.org "torch-distributed" not found'
    api = FakeApi([[]], kubeflow=True, refuse_trainjob=words)
    with pytest.raises(TrainingJobError) as caught:
        list(_run_train_job(serve(api)))
    assert caught.value.reason == "Refused"
    assert "refused TrainJob run-1 (runtime 'torch-distributed')" in str(caught.value) and words in str(caught.value)
    assert api.calls("DELETE") == []  # nothing was made
