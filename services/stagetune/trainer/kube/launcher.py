"""The trainer job's choice between local worker processes and a Kubernetes training run, and that run.

A trainer pod holds the GPUs its Deployment asked for. A run needing more (several machines, or more processes
than those GPUs) cannot start there; where the chart enabled the launcher it becomes an Indexed Job + headless
Service (objects.py) whose pods run `stagetune.trainer.worker` under torchrun. The pods share only the store with
the trainer, so the worker spec is put there and rank 0 leaves its progress and outcome there; the trainer job
relays the pods' states and rank 0's steps, metrics and log lines as its own, fails with the pods' own failure,
and removes the objects.

Set by the chart (values `trainer.launcher`) on the trainer's container:
    STAGETUNE_TRAINER_LAUNCHER=kubernetes   enable it (anything else, or unset: local processes)
    STAGETUNE_KUBE_IMAGE                    the workers' image (the profile's variant)
    STAGETUNE_KUBE_PROFILE                  the workers' GPU profile (kube/profiles.py)
    STAGETUNE_KUBE_NAMESPACE                where the Job goes (default: the pod's own namespace)
    STAGETUNE_KUBE_SECRET                   the Secret with s3-access-key, s3-secret-key (and api-token)
    STAGETUNE_KUBE_SERVICE_ACCOUNT          the workers' service account (optional)
    STAGETUNE_KUBE_S3_CA                    CONFIGMAP:KEY of the S3 CA bundle, mounted in the workers too (optional)
    STAGETUNE_KUBE_TLS_SECRET               the gRPC TLS Secret, mounted in the workers so that rank 0 calls
                                            validation as the trainer does (optional; with the chart's tls)
    STAGETUNE_TRAINER_GPUS                  the GPUs of the trainer pod itself (0: none)
    STAGETUNE_KUBE_RUN_KIND                 auto (default): a Kubeflow Trainer TrainJob where the cluster serves
                                            them, else an Indexed Job; job or trainjob to insist on one
    STAGETUNE_KUBE_TRAINJOB_RUNTIME         the runtime a TrainJob uses: a ClusterTrainingRuntime's name, or
                                            TrainingRuntime/NAME (the chart's own); default torch-distributed
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from stagetune.core import errors
from stagetune.core.errors import ConfigError
from stagetune.trainer.kube.objects import DEFAULT_TRAINJOB_RUNTIME, KUBEFLOW_GROUP, KUBEFLOW_VERSION

ENV_LAUNCHER = "STAGETUNE_TRAINER_LAUNCHER"
ENV_IMAGE = "STAGETUNE_KUBE_IMAGE"
ENV_PROFILE = "STAGETUNE_KUBE_PROFILE"
ENV_NAMESPACE = "STAGETUNE_KUBE_NAMESPACE"
ENV_SECRET = "STAGETUNE_KUBE_SECRET"
ENV_SERVICE_ACCOUNT = "STAGETUNE_KUBE_SERVICE_ACCOUNT"
ENV_S3_CA = "STAGETUNE_KUBE_S3_CA"  # "CONFIGMAP:KEY": the S3 CA bundle the training pods mount too
ENV_TLS_SECRET = "STAGETUNE_KUBE_TLS_SECRET"
ENV_LOCAL_GPUS = "STAGETUNE_TRAINER_GPUS"
ENV_RUN_KIND = "STAGETUNE_KUBE_RUN_KIND"
ENV_TRAINJOB_RUNTIME = "STAGETUNE_KUBE_TRAINJOB_RUNTIME"
RUN_KINDS = ("auto", "job", "trainjob")
RUNTIME_KINDS = ("TrainingRuntime", "ClusterTrainingRuntime")
KUBERNETES = "kubernetes"
_POD_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclasses.dataclass(frozen=True)
class LauncherSettings:
    image: str
    profile: str
    namespace: str
    secret: str
    service_account: str | None = None
    local_gpus: int = 0
    s3_ca: tuple[str, str] | None = None
    run_kind: str = "auto"
    trainjob_runtime: str = DEFAULT_TRAINJOB_RUNTIME
    trainjob_runtime_kind: str = "ClusterTrainingRuntime"
    tls_secret: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LauncherSettings | None:
        """The cluster launcher's settings; None when it is not enabled. Enabled but incomplete is an error
        naming the variable, said when a run needs it (the trainer serves single-GPU runs regardless)."""
        env = os.environ if env is None else env
        if env.get(ENV_LAUNCHER, "").strip().lower() != KUBERNETES:
            return None
        from stagetune.trainer.kube.profiles import profile

        missing = [name for name in (ENV_IMAGE, ENV_PROFILE, ENV_SECRET) if not env.get(name, "").strip()]
        if missing:
            raise ConfigError(f"{ENV_LAUNCHER}=kubernetes needs {', '.join(missing)} (the chart's trainer.launcher "
                              "values set them)", field="num_processes")
        try:
            profile(env[ENV_PROFILE].strip())
            local_gpus = int(env.get(ENV_LOCAL_GPUS, "0") or 0)
        except ValueError as exc:
            raise ConfigError(f"{ENV_PROFILE} / {ENV_LOCAL_GPUS}: {exc}", field="num_processes") from None
        namespace = env.get(ENV_NAMESPACE, "").strip() or _own_namespace()
        if not namespace:
            raise ConfigError(f"{ENV_NAMESPACE} is not set and this is not a pod", field="num_processes")
        s3_ca = None
        if env.get(ENV_S3_CA, "").strip():
            config_map, _, key = env[ENV_S3_CA].strip().partition(":")
            if not config_map or not key:
                raise ConfigError(f"{ENV_S3_CA} must be CONFIGMAP:KEY, got {env[ENV_S3_CA]!r}", field="num_processes")
            s3_ca = (config_map, key)
        run_kind = env.get(ENV_RUN_KIND, "").strip().lower() or "auto"
        if run_kind not in RUN_KINDS:
            raise ConfigError(f"{ENV_RUN_KIND} must be one of {', '.join(RUN_KINDS)}, got {env[ENV_RUN_KIND]!r}",
                              field="num_processes")
        runtime_kind, _, runtime = (env.get(ENV_TRAINJOB_RUNTIME, "").strip() or DEFAULT_TRAINJOB_RUNTIME
                                    ).rpartition("/")
        if runtime_kind not in ("", *RUNTIME_KINDS) or not runtime:
            raise ConfigError(f"{ENV_TRAINJOB_RUNTIME} must be NAME (a ClusterTrainingRuntime) or KIND/NAME with KIND "
                              f"one of {', '.join(RUNTIME_KINDS)}, got {env[ENV_TRAINJOB_RUNTIME]!r}",
                              field="num_processes")
        return cls(image=env[ENV_IMAGE].strip(), profile=env[ENV_PROFILE].strip(), namespace=namespace,
                   secret=env[ENV_SECRET].strip(), service_account=env.get(ENV_SERVICE_ACCOUNT, "").strip() or None,
                   local_gpus=local_gpus, s3_ca=s3_ca, run_kind=run_kind, trainjob_runtime=runtime,
                   trainjob_runtime_kind=runtime_kind or "ClusterTrainingRuntime",
                   tls_secret=env.get(ENV_TLS_SECRET, "").strip() or None)

    def launches(self, cfg: Any) -> bool:
        """A run goes to the cluster when it spans machines or wants more processes than this pod has GPUs.
        A single process always trains in the trainer pod, as without the launcher."""
        if cfg.num_processes <= 1:
            return False
        return cfg.num_machines > 1 or cfg.num_processes > self.local_gpus

    def trainjob_runtime_on(self, api_client: Any) -> str | None:
        """The runtime to start a TrainJob on, or None for the operator-free Indexed Job."""
        if self.run_kind == "job":
            return None
        from stagetune.trainer.kube.client import has_trainjobs

        if has_trainjobs(api_client):
            return self.trainjob_runtime
        if self.run_kind == "trainjob":
            raise ConfigError(f"{ENV_RUN_KIND}=trainjob, but the cluster serves no TrainJobs "
                              f"({KUBEFLOW_GROUP}/{KUBEFLOW_VERSION}): install Kubeflow Trainer, or set the chart's "
                              "trainer.launcher.runKind to auto or job", field="num_processes")
        return None

    def shape(self, cfg: Any) -> tuple[int, int]:
        """(nodes, processes per node): one pod per machine, each with its share of the processes."""
        return cfg.num_machines, cfg.num_processes // cfg.num_machines


def _own_namespace() -> str:
    try:
        with open(_POD_NAMESPACE_FILE) as handle:
            return handle.read().strip()
    except OSError:
        return ""


def run_name(job_id: str) -> str:
    """A DNS-1035 label (Job, Service and pod host names), unique per trainer job."""
    return f"st-{job_id}".lower()[:52].rstrip("-")


def run_on_cluster(ctx: Any, cfg: Any, settings: LauncherSettings, api_client: Any = None, *,
                   poll_s: float = 5.0, unschedulable_limit: float = 600.0) -> dict[str, str]:
    """Train as a Kubernetes run; returns rank 0's outputs or raises its (or its pods') failure."""
    from stagetune.trainer.kube.client import run_training_job
    from stagetune.trainer.service import validation_endpoint
    from stagetune.trainer.worker import STORE_SPEC, StoreEventReader, result_key, spec_bytes, spec_key

    store = ctx.store
    store.put_bytes(spec_key(ctx.job_id), spec_bytes(request=ctx.request, store_url=store.url, job_id=ctx.job_id))
    if store.exists(result_key(ctx.job_id)):
        store.delete(result_key(ctx.job_id))  # a rerun of this job reads only its own ending
    progress = StoreEventReader(store, ctx.job_id)
    progress.clear()
    nodes, per_node = settings.shape(cfg)
    run = run_name(ctx.job_id)
    env = {"STAGETUNE_VALIDATION_ENDPOINT": validation_endpoint(ctx.request)} if validation_endpoint(
        ctx.request) else {}
    if settings.tls_secret:
        env.update(_tls_client_env())
    secret_env = {"STAGETUNE_API_TOKEN": "api-token"} if _has_token() else {}
    if api_client is None:
        api_client = _in_cluster_client()
    runtime = settings.trainjob_runtime_on(api_client)
    kind = (f"a Kubeflow TrainJob on {settings.trainjob_runtime_kind} {runtime}" if runtime
            else "an Indexed Job")
    ctx.log(f"starting training run {run} on the cluster as {kind}: {nodes} pod(s) x {per_node} process(es) on "
            f"{settings.profile} in namespace {settings.namespace}")
    events = run_training_job(
        api_client, run=run, namespace=settings.namespace, profile=settings.profile, nodes=nodes,
        gpus_per_node=per_node, image=settings.image,
        worker=["-m", "stagetune.trainer.worker", STORE_SPEC + spec_key(ctx.job_id)], store_url=store.url,
        secret_name=settings.secret, service_account=settings.service_account, env=env, secret_env=secret_env,
        s3_ca=settings.s3_ca, tls_secret=settings.tls_secret, trainjob_runtime=runtime,
        trainjob_runtime_kind=settings.trainjob_runtime_kind,
        on_poll=lambda: _relay_progress(ctx, progress), poll_s=poll_s, unschedulable_limit=unschedulable_limit,
        cancelled=ctx.cancelled.is_set)
    try:
        _relay(ctx, events, nodes)
    except errors.StagetuneError as exc:
        _relay_progress(ctx, progress)  # rank 0's last words before it failed
        ended = _ending(store, ctx.job_id)
        if "error" in ended:  # the worker's own words beat "the Job failed"
            raise _worker_error(ended["error"]) from exc
        raise
    _relay_progress(ctx, progress)
    return _outcome(_ending(store, ctx.job_id))


def _relay_progress(ctx: Any, progress: Any) -> None:
    """Rank 0's steps, metrics and log lines, as it left them in the store, as this job's own."""
    from stagetune.trainer.worker import relay_event

    try:
        events = progress.read()
    except errors.StagetuneError as exc:  # a store hiccup: the next poll reads on from where this one stopped
        ctx.log(f"cannot read the training run's progress from the store yet: {exc}", "warning")
        return
    for kind, values in events:
        try:
            relay_event(ctx, kind, values)
        except (TypeError, ValueError, IndexError) as exc:  # one odd event never stops a running run
            ctx.log(f"ignored a malformed progress event from the training run ({kind}: {exc})", "warning")


def _relay(ctx: Any, events: Any, nodes: int) -> None:
    running: set[str] = set()
    ctx.progress("training pods running", 0, nodes, "pods")
    for event in events:
        rank = f"node {event.node_rank}" if event.node_rank is not None else "pod"
        ctx.log(f"{rank} ({event.pod}): {event.phase}" + (f", {event.detail}" if event.detail else ""))
        (running.add if event.phase == "Running" else running.discard)(event.pod)
        ctx.progress("training pods running", len(running), nodes, "pods")


def _ending(store: Any, job_id: str) -> dict[str, Any]:
    from stagetune.trainer.worker import result_key

    key = result_key(job_id)
    return json.loads(store.get_bytes(key)) if store.exists(key) else {}


def _worker_error(error: list[str]) -> errors.StagetuneError:
    name, message, field_name = error
    cls = getattr(errors, name, errors.StagetuneError)
    if not (isinstance(cls, type) and issubclass(cls, errors.StagetuneError)):
        cls = errors.StagetuneError
    return cls(message, field=field_name or None)


def _outcome(ended: dict[str, Any]) -> dict[str, str]:
    from stagetune.core.jobs import JobCancelled

    if "error" in ended:
        raise _worker_error(ended["error"])
    if ended.get("cancelled"):
        raise JobCancelled("training cancelled")
    if "outputs" not in ended:
        raise errors.UnavailableError("the training run's pods finished without rank 0 reporting its outputs",
                                      field="num_processes")
    return {str(k): str(v) for k, v in ended["outputs"].items()}


def _tls_client_env() -> dict[str, str]:
    """The trainer's own settings for calling validation over TLS (file paths in the Secret's mount, which the
    training pods mount at the same place): the pods call it as the trainer would."""
    from stagetune.core import security

    names = (security.ENV_TLS_CA, security.ENV_TLS_CLIENT_CERT, security.ENV_TLS_CLIENT_KEY,
             security.ENV_TLS_SERVER_NAME)
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def _has_token() -> bool:
    from stagetune.core.security import load_token

    return load_token() is not None


def _in_cluster_client() -> Any:
    from kubernetes import client, config

    config.load_incluster_config()
    return client.ApiClient()


def launcher_for(cfg: Any, env: Mapping[str, str] | None = None) -> LauncherSettings | None:
    """The cluster launcher when it is enabled and this run needs it; None: local worker processes."""
    settings = LauncherSettings.from_env(env)
    return settings if settings is not None and settings.launches(cfg) else None

