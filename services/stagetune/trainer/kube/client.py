"""Create, follow and remove a training run's Job and Service through the `kubernetes` client.

Pod state is polled (list pods by the run's label, read the Job) rather than watched: a poll survives API
server restarts and proxies that cut long watches, and a run lasts hours, so seconds of latency cost
nothing. Failures a user can act on are raised as `TrainingJobError` with the cause in words.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

from stagetune.core.errors import StagetuneError
from stagetune.trainer.kube.objects import RUN_LABEL, training_objects
from stagetune.trainer.kube.profiles import profile as get_profile

_PULL_ERRORS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}


class TrainingJobError(StagetuneError):
    """A training run's pods cannot run or died; `reason` is OOMKilled, ImagePull, Unschedulable or Failed."""

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


class TrainingJobs:
    """One namespace's training runs. `api_client` is a configured `kubernetes.client.ApiClient`."""

    def __init__(self, api_client: Any, namespace: str, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        from kubernetes import client

        self.namespace = namespace
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._clock, self._sleep = clock, sleep

    def create(self, job: dict[str, Any], service: dict[str, Any]) -> None:
        """The Service first, so node 0's name resolves by the time any pod starts."""
        self._core.create_namespaced_service(self.namespace, service)
        try:
            self._batch.create_namespaced_job(self.namespace, job)
        except Exception:
            self._delete_service(service["metadata"]["name"])
            raise

    def delete(self, run: str) -> None:
        """Remove the Job with its pods and the Service; what is already gone is fine."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._batch.delete_namespaced_job(run, self.namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise
        self._delete_service(run)

    def _delete_service(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._core.delete_namespaced_service(name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def follow(self, run: str, *, poll_s: float = 5.0, unschedulable_limit: float = 600.0,
               timeout: float | None = None, cancelled: Callable[[], bool] = lambda: False) -> Iterator[PodEvent]:
        """Yield each pod state change until the Job completes; raise `TrainingJobError` on a failure, and
        `JobCancelled` once `cancelled()` says so (checked every poll, not only when a pod changes)."""
        from stagetune.core.jobs import JobCancelled

        last: dict[str, PodEvent] = {}
        pending_since: dict[str, float] = {}
        started = self._clock()
        while True:
            if cancelled():
                raise JobCancelled(f"training run {run} cancelled")
            now = self._clock()
            pods = self._core.list_namespaced_pod(self.namespace, label_selector=f"{RUN_LABEL}={run}").items
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
            status = self._batch.read_namespaced_job(run, self.namespace).status
            for condition in (status.conditions or []):
                if condition.type == "Complete" and condition.status == "True":
                    return
                if condition.type == "Failed" and condition.status == "True":
                    raise TrainingJobError(f"training run {run} failed: {condition.reason}: {condition.message}",
                                           "Failed")
            if timeout is not None and now - started > timeout:
                raise TrainingJobError(f"training run {run} did not finish in {timeout:.0f}s", "Timeout")
            self._sleep(poll_s)


def run_training_job(api_client: Any, *, run: str, namespace: str, profile: str, nodes: int, gpus_per_node: int,
                     image: str, worker: list[str], store_url: str, secret_name: str,
                     poll_s: float = 5.0, unschedulable_limit: float = 600.0,
                     cancelled: Callable[[], bool] = lambda: False, **options: Any) -> Iterator[PodEvent]:
    """Start a run on `profile`'s nodes, yield its pod events, and remove its objects however it ends
    (success, failure, cancellation, or the caller stopping). The trainer's entry is kube/launcher.py."""
    job, service = training_objects(run=run, namespace=namespace, profile=get_profile(profile), nodes=nodes,
                                    gpus_per_node=gpus_per_node, image=image, worker=worker,
                                    store_url=store_url, secret_name=secret_name, **options)
    jobs = TrainingJobs(api_client, namespace)
    jobs.create(job, service)
    try:
        yield from jobs.follow(run, poll_s=poll_s, unschedulable_limit=unschedulable_limit, cancelled=cancelled)
    finally:
        jobs.delete(run)
