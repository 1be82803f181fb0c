"""Create, follow and remove a training run's objects through the `kubernetes` client: an Indexed Job and
its Service, or a Kubeflow TrainJob where the cluster has Kubeflow Trainer.

Pod state is polled (list pods by the run's label, read the Job) rather than watched: a poll survives API
server restarts and proxies that cut long watches, and a run lasts hours, so seconds of latency cost
nothing. Failures a user can act on are raised as `TrainingJobError` with the cause in words.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from stagetune.core.errors import StagetuneError
from stagetune.trainer.kube.objects import (
    KUBEFLOW_GROUP,
    KUBEFLOW_VERSION,
    RUN_LABEL,
    RunPod,
    train_job,
    training_objects,
)
from stagetune.trainer.kube.profiles import profile as get_profile

_PULL_ERRORS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}


class TrainingJobError(StagetuneError):
    """A training run's pods cannot run or died; `reason` is OOMKilled, ImagePull, Unschedulable, Failed,
    Refused (the API server would not take the run's objects) or Timeout."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, field="training_job")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class PodEvent:
    pod: str
    node_rank: int | None
    phase: str  # Pending, Running, Succeeded, Failed
    detail: str  # e.g. "waiting: ContainerCreating", "terminated: Completed (exit 0)"


def _detail(pod: Any) -> str:
    for status in (pod.status.container_statuses or []):
        state = status.state
        if state.terminated:
            return f"terminated: {state.terminated.reason} (exit {state.terminated.exit_code})"
        if state.waiting:
            return f"waiting: {state.waiting.reason}"
        if state.running:
            return "running"
    for condition in (pod.status.conditions or []):
        if condition.type == "PodScheduled" and condition.status == "False":
            return f"unschedulable: {condition.message or condition.reason}"
    return ""


def failure(pod: Any, unschedulable_for: float, unschedulable_limit: float) -> TrainingJobError | None:
    """The error a pod's state means, if any. Unschedulable counts only after `unschedulable_limit` seconds:
    an autoscaler may still be adding the node."""
    name = pod.metadata.name
    for status in (pod.status.container_statuses or []):
        terminated = status.state.terminated or (status.last_state.terminated if status.last_state else None)
        if terminated and terminated.reason == "OOMKilled":
            return TrainingJobError(f"{name} was killed for using more memory than its limit (OOMKilled): raise "
                                    "the memory limit or lower train_batch_size", "OOMKilled")
        last = status.last_state.terminated if status.last_state else None
        if (status.restart_count or 0) > 0 and last is not None and last.exit_code:
            # A runtime that restarts failed containers in place (restartPolicy OnFailure, e.g. Kubeflow's
            # stock torch-distributed) would retry a failed rank for hours; a run resumes from checkpoints.
            return TrainingJobError(f"{name}'s worker exited with code {last.exit_code} ({last.reason}) and was "
                                    "restarted in place; the run stops instead and resumes from its last checkpoint "
                                    "when started again (use a runtime with restartPolicy Never, as the chart's "
                                    "own)", "Failed")
        waiting = status.state.waiting
        if waiting and waiting.reason in _PULL_ERRORS:
            return TrainingJobError(f"{name} cannot pull its image {status.image} ({waiting.reason}): "
                                    f"{waiting.message or 'check the name, tag and imagePullSecrets'}", "ImagePull")
    for condition in (pod.status.conditions or []):
        if (condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable"
                and unschedulable_for >= unschedulable_limit):
            return TrainingJobError(f"no node can take {name} after {unschedulable_for:.0f}s: {condition.message} "
                                    "(are nodes of this GPU profile present, with the GPUs free?)", "Unschedulable")
    return None


def _ended(conditions: list[dict[str, Any]], what: str) -> bool:
    """True once `Complete`; a `Failed` condition raises with the controller's reason and message. Jobs and
    TrainJobs report their end the same way (`conditions[].type/status/reason/message`)."""
    for condition in conditions:
        if condition.get("type") == "Complete" and condition.get("status") == "True":
            return True
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            raise TrainingJobError(f"{what} failed: {condition.get('reason')}: {condition.get('message')}", "Failed")
    return False


class RunObjects(Protocol):
    """One way of starting a run's pods; the pods carry `RUN_LABEL=<run>` whichever way it is."""

    run: str

    def create(self) -> None: ...

    def ended(self) -> bool: ...

    def delete(self) -> None: ...


class IndexedJobRun:
    """The operator-free run: an Indexed Job and its headless Service (objects.training_objects)."""

    def __init__(self, api_client: Any, namespace: str, job: dict[str, Any], service: dict[str, Any]) -> None:
        from kubernetes import client

        self.run, self.namespace = job["metadata"]["name"], namespace
        self._job, self._service = job, service
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)

    def create(self) -> None:
        """The Service first, so node 0's name resolves by the time any pod starts."""
        self._core.create_namespaced_service(self.namespace, self._service)
        try:
            self._batch.create_namespaced_job(self.namespace, self._job)
        except Exception:
            _gone_is_fine(self._core.delete_namespaced_service, self._service["metadata"]["name"], self.namespace)
            raise

    def ended(self) -> bool:
        status = self._batch.read_namespaced_job(self.run, self.namespace).status
        return _ended([c.to_dict() for c in status.conditions or []], f"training run {self.run}")

    def delete(self) -> None:
        """Remove the Job with its pods and the Service; what is already gone is fine."""
        _gone_is_fine(self._batch.delete_namespaced_job, self.run, self.namespace, propagation_policy="Background")
        _gone_is_fine(self._core.delete_namespaced_service, self.run, self.namespace)


class KubeflowTrainJobRun:
    """A Kubeflow Trainer TrainJob (objects.train_job): the cluster's own training operator runs the pods
    (through a JobSet) and owns their network; deleting the TrainJob removes everything it made."""

    def __init__(self, api_client: Any, namespace: str, train_job: dict[str, Any]) -> None:
        from kubernetes import client

        self.run, self.namespace = train_job["metadata"]["name"], namespace
        self._object = train_job
        self._custom = client.CustomObjectsApi(api_client)

    def create(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._custom.create_namespaced_custom_object(KUBEFLOW_GROUP, KUBEFLOW_VERSION, self.namespace,
                                                         "trainjobs", self._object)
        except ApiException as exc:
            if exc.status in (400, 403, 404, 422):  # the admission webhook's or RBAC's own words
                runtime = self._object["spec"]["runtimeRef"]["name"]
                raise TrainingJobError(f"the cluster refused TrainJob {self.run} (runtime {runtime!r}): "
                                       f"{_api_message(exc)}", "Refused") from None
            raise

    def ended(self) -> bool:
        found = self._custom.get_namespaced_custom_object(KUBEFLOW_GROUP, KUBEFLOW_VERSION, self.namespace,
                                                          "trainjobs", self.run)
        return _ended((found.get("status") or {}).get("conditions") or [], f"training run {self.run} (TrainJob)")

    def delete(self) -> None:
        _gone_is_fine(self._custom.delete_namespaced_custom_object, KUBEFLOW_GROUP, KUBEFLOW_VERSION,
                      self.namespace, "trainjobs", self.run, propagation_policy="Background")


def has_trainjobs(api_client: Any) -> bool:
    """Whether the cluster serves Kubeflow Trainer's TrainJob (its CRD is installed). Discovery needs no
    permission beyond what every authenticated client has."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        resources = client.CustomObjectsApi(api_client).get_api_resources(KUBEFLOW_GROUP, KUBEFLOW_VERSION)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return any(resource.name == "trainjobs" for resource in (resources.resources or []))


def _create(objects: RunObjects) -> None:
    """Create the run's objects. A name already taken is said plainly; a create whose answer was lost (a
    timeout, a 5xx) may still have made them, so they are removed before the error is passed on."""
    from kubernetes.client.exceptions import ApiException

    try:
        objects.create()
    except ApiException as exc:
        if exc.status == 409:
            raise TrainingJobError(f"a training run named {objects.run} already exists in namespace "
                                   f"{objects.namespace} (left by an earlier attempt of this job?): delete it and "
                                   "start again", "Refused") from None
        if exc.status is None or exc.status >= 500:
            _best_effort(objects.delete)
        raise
    except TrainingJobError:  # refused by the API server: nothing was made
        raise
    except Exception:  # no answer at all (a timeout, a reset connection)
        _best_effort(objects.delete)
        raise


def _best_effort(action: Callable[[], Any]) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001 - the caller's error is the one to report
        pass


def _gone_is_fine(delete: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        delete(*args, **kwargs)
    except ApiException as exc:
        if exc.status != 404:
            raise


def _api_message(exc: Any) -> str:
    try:
        return json.loads(exc.body).get("message") or str(exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


def follow(api_client: Any, objects: RunObjects, *, poll_s: float = 5.0, unschedulable_limit: float = 600.0,
           timeout: float | None = None, cancelled: Callable[[], bool] = lambda: False,
           on_poll: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> Iterator[PodEvent]:
    """Yield each pod state change until the run completes; raise `TrainingJobError` on a failure, and
    `JobCancelled` once `cancelled()` says so (checked every poll, not only when a pod changes). `on_poll`
    runs once a poll, whatever the pods do (the launcher relays the run's own progress there)."""
    from kubernetes import client

    from stagetune.core.jobs import JobCancelled

    core = client.CoreV1Api(api_client)
    run = objects.run
    last: dict[str, PodEvent] = {}
    pending_since: dict[str, float] = {}
    started = clock()
    while True:
        if cancelled():
            raise JobCancelled(f"training run {run} cancelled")
        now = clock()
        pods = core.list_namespaced_pod(objects.namespace, label_selector=f"{RUN_LABEL}={run}").items
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            name = pod.metadata.name
            annotations = pod.metadata.annotations or {}
            rank = annotations.get("batch.kubernetes.io/job-completion-index")
            event = PodEvent(name, int(rank) if rank is not None else None, pod.status.phase or "Pending",
                             _detail(pod))
            if last.get(name) != event:
                last[name] = event
                yield event
            since = pending_since.setdefault(name, now) if event.phase == "Pending" else now
            problem = failure(pod, now - since, unschedulable_limit)
            if problem:
                raise problem
        on_poll()
        if objects.ended():
            return
        if timeout is not None and now - started > timeout:
            raise TrainingJobError(f"training run {run} did not finish in {timeout:.0f}s", "Timeout")
        sleep(poll_s)


def run_training_job(api_client: Any, *, run: str, namespace: str, profile: str, nodes: int, gpus_per_node: int,
                     image: str, worker: list[str], store_url: str, secret_name: str,
                     trainjob_runtime: str | None = None, trainjob_runtime_kind: str = "ClusterTrainingRuntime",
                     poll_s: float = 5.0, unschedulable_limit: float = 600.0,
                     cancelled: Callable[[], bool] = lambda: False, on_poll: Callable[[], None] = lambda: None,
                     **options: Any) -> Iterator[PodEvent]:
    """Start a run on `profile`'s nodes, yield its pod events, and remove its objects however it ends
    (success, failure, cancellation, or the caller stopping). With `trainjob_runtime` the run is a Kubeflow
    TrainJob on that runtime, else an Indexed Job. The trainer's entry is kube/launcher.py."""
    pod = RunPod(profile=get_profile(profile), gpus_per_node=gpus_per_node, store_url=store_url,
                 secret_name=secret_name, **options)
    objects: RunObjects
    if trainjob_runtime:
        objects = KubeflowTrainJobRun(api_client, namespace, train_job(
            run=run, namespace=namespace, nodes=nodes, worker=worker, image=image, pod=pod, runtime=trainjob_runtime,
            runtime_kind=trainjob_runtime_kind))
    else:
        job, service = training_objects(run=run, namespace=namespace, nodes=nodes, worker=worker, image=image, pod=pod)
        objects = IndexedJobRun(api_client, namespace, job, service)
    _create(objects)
    try:
        yield from follow(api_client, objects, poll_s=poll_s, unschedulable_limit=unschedulable_limit,
                          cancelled=cancelled, on_poll=on_poll)
    finally:
        objects.delete()
