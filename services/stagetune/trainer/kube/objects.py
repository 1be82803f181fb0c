"""The Kubernetes objects of one multi-node training run, as plain dicts (what the API server takes).

Without an operator, an Indexed Job runs one pod per node; pod i is `<run>-<i>.<run>` through the headless
Service, so every node finds node 0 for torchrun's c10d rendezvous. The Service publishes pods before they are
ready, because the rendezvous happens before any readiness could be reported. Where Kubeflow Trainer is
installed, one TrainJob does the same through the cluster's torch runtime (`train_job`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from stagetune.trainer.kube.profiles import GpuProfile

RDZV_PORT = 29400
RUN_LABEL = "stagetune.io/training-run"
#: The component label of training pods: the chart's NetworkPolicies select them by it.
TRAINING_COMPONENT = "training-run"


COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
#: Cancel deletes the run's objects: SIGTERM makes every rank stop at the same step and rank 0 save a checkpoint,
#: which needs as long as the trainer's own (the chart's trainer.terminationGracePeriodSeconds).
GRACE_SECONDS = 900

#: Kubeflow Trainer v2: its API group, the torch runtime's replicated job and container, and our patch's owner.
KUBEFLOW_GROUP = "trainer.kubeflow.org"
KUBEFLOW_VERSION = "v1alpha1"
KUBEFLOW_TRAINER_JOB = "node"
KUBEFLOW_TRAINER_CONTAINER = "node"
DEFAULT_TRAINJOB_RUNTIME = "torch-distributed"
PATCH_MANAGER = "stagetune.io/trainer"

#: Where the chart mounts the S3 CA bundle in the services (its store URL names a file here).
S3_CA_DIR = "/etc/stagetune/s3-ca"
#: Where the chart mounts the gRPC TLS Secret (tls.crt, tls.key, ca.crt) in the services.
TLS_DIR = "/var/run/stagetune/tls"


def image_for(repository: str, tag: str, profile: GpuProfile) -> str:
    """The image variant a profile needs (the chart's rule: <repository>:<tag>-<cuda|rocm>)."""
    return f"{repository}:{tag}-{profile.image}"


def torchrun_command(run: str, nodes: int, gpus_per_node: int, worker: list[str]) -> list[str]:
    """torchrun with c10d rendezvous at node 0; the worker command is the caller's (its module and args)."""
    return ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={gpus_per_node}",
            "--node-rank=$(JOB_COMPLETION_INDEX)", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={run}-0.{run}:{RDZV_PORT}", f"--rdzv-id={run}", *worker]


@dataclasses.dataclass(frozen=True)
class RunPod:
    """What every pod of a run needs, whichever object starts it (an Indexed Job here, or a Kubeflow TrainJob):
    the store and its credentials, writable scratch on a read-only root, shared memory, the GPU profile's
    placement, and the S3 CA bundle where the services have it (`S3_CA_DIR`), so the same store URL
    (`ca_bundle=...`) works in the training pods.

    `secret_env` maps variables to keys of `secret_name` (the API token rank 0 calls validation with), so no
    secret is ever written into an object's spec."""

    profile: GpuProfile
    gpus_per_node: int
    store_url: str
    secret_name: str
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    secret_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    memory: str = "64Gi"
    shm_size: str = "32Gi"
    service_account: str | None = None
    uid: int = 10001
    s3_ca: tuple[str, str] | None = None
    #: The gRPC TLS Secret, mounted where the services have it (`TLS_DIR`): rank 0 calls validation with the
    #: trainer's own client settings (their paths point there).
    tls_secret: str | None = None

    def resources(self) -> dict[str, Any]:
        limits: dict[str, str] = {"memory": self.memory}
        if self.profile.resource:
            limits[self.profile.resource] = str(self.gpus_per_node)  # a quantity: the API client wants a string
        return {"limits": limits, "requests": dict(limits)}

    def variables(self) -> list[dict[str, Any]]:
        return [
            {"name": "STAGETUNE_STORE", "value": self.store_url},
            {"name": "STAGETUNE_S3_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": self.secret_name,
                                                                               "key": "s3-access-key"}}},
            {"name": "STAGETUNE_S3_SECRET_KEY", "valueFrom": {"secretKeyRef": {"name": self.secret_name,
                                                                               "key": "s3-secret-key"}}},
            {"name": "HOME", "value": "/cache"}, {"name": "XDG_CACHE_HOME", "value": "/cache"},
            {"name": "HF_HOME", "value": "/cache/huggingface"}, {"name": "TMPDIR", "value": "/tmp"},
            *({"name": k, "value": v} for k, v in sorted(self.env.items())),
            *({"name": k, "valueFrom": {"secretKeyRef": {"name": self.secret_name, "key": key}}}
              for k, key in sorted(self.secret_env.items())),
        ]

    def volumes(self) -> list[dict[str, Any]]:
        # NCCL/RCCL and the data loaders share memory through /dev/shm; the runtime's default is 64 MiB.
        volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": self.shm_size}},
                                         {"name": "cache", "emptyDir": {}},
                                         {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}]
        if self.s3_ca is not None:
            config_map, key = self.s3_ca
            volumes.append({"name": "s3-ca", "configMap": {"name": config_map, "items": [{"key": key, "path": key}]}})
        if self.tls_secret is not None:
            volumes.append({"name": "tls", "secret": {"secretName": self.tls_secret}})
        return volumes

    def volume_mounts(self) -> list[dict[str, Any]]:
        mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"},
                                        {"name": "cache", "mountPath": "/cache"}, {"name": "tmp", "mountPath": "/tmp"}]
        if self.s3_ca is not None:
            mounts.append({"name": "s3-ca", "mountPath": S3_CA_DIR, "readOnly": True})
        if self.tls_secret is not None:
            mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        return mounts

    def pod_security(self) -> dict[str, Any]:
        return {"runAsUser": self.uid, "runAsGroup": self.uid, "fsGroup": self.uid, "runAsNonRoot": True,
                "seccompProfile": {"type": "RuntimeDefault"}}

    @staticmethod
    def container_security() -> dict[str, Any]:
        return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                "capabilities": {"drop": ["ALL"]}}

    def affinity(self) -> dict[str, Any]:
        return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": self.profile.node_expressions()}]}}}

    def placement(self) -> dict[str, Any]:
        """Affinity, tolerations and service account: the pod fields both kinds of run set alike."""
        placed: dict[str, Any] = {"affinity": self.affinity()}
        if self.profile.tolerations:
            placed["tolerations"] = [dict(t) for t in self.profile.tolerations]
        if self.service_account:
            placed["serviceAccountName"] = self.service_account
        return placed

    def check(self, nodes: int, worker: list[str]) -> None:
        if nodes < 1 or self.gpus_per_node < (0 if self.profile.resource is None else 1):
            raise ValueError(f"{nodes} node(s) x {self.gpus_per_node} GPU(s) on {self.profile.name}: need >= 1 node "
                             "and, on a GPU profile, >= 1 GPU per node")
        if not worker:
            raise ValueError("the worker command is empty")


def run_labels(run: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "stagetune", "app.kubernetes.io/component": TRAINING_COMPONENT, RUN_LABEL: run}


def training_objects(*, run: str, namespace: str, nodes: int, worker: list[str],
                     image: str, pod: RunPod) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Job, headless Service) for `nodes` pods of `pod.gpus_per_node` GPUs each on the profile's nodes."""
    pod.check(nodes, worker)
    labels = run_labels(run)
    variables = [
        # Set explicitly so $(JOB_COMPLETION_INDEX) in the command expands on every Kubernetes version.
        {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}}},
        *pod.variables(),
    ]
    pod_spec: dict[str, Any] = {
        "subdomain": run,  # <run>-<i>.<run> resolves through the headless Service
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "automountServiceAccountToken": False,
        "securityContext": pod.pod_security(),
        "containers": [{
            "name": "worker",
            "image": image,
            "command": torchrun_command(run, nodes, pod.gpus_per_node, worker),
            "env": variables,
            "ports": [{"name": "c10d", "containerPort": RDZV_PORT, "protocol": "TCP"}],
            "resources": pod.resources(),
            "securityContext": pod.container_security(),
            "volumeMounts": pod.volume_mounts(),
        }],
        "volumes": pod.volumes(),
        **pod.placement(),
    }
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": run, "namespace": namespace, "labels": labels},
        "spec": {
            "completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
            # One failed node fails the run: it resumes from its last checkpoint when started again.
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 3600,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": run, "namespace": namespace, "labels": labels},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {RUN_LABEL: run},
                 "ports": [{"name": "c10d", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}]},
    }
    return job, service


def train_job(*, run: str, namespace: str, nodes: int, worker: list[str], image: str, pod: RunPod,
              runtime: str = DEFAULT_TRAINJOB_RUNTIME, runtime_kind: str = "ClusterTrainingRuntime") -> dict[str, Any]:
    """A Kubeflow Trainer TrainJob (v2.2 and later: `runtimePatches`) on `runtime`, a runtime with the torch
    policy: the chart's own TrainingRuntime (restartPolicy Never, backoffLimit 0, our grace period, no API
    token, none of which a runtime patch may set), or a ClusterTrainingRuntime such as `torch-distributed`.

    The runtime's torch plugin gives every node torchrun's settings as `PET_*` variables (node rank from the
    completion index, node 0 as master), so the command is plain `torchrun <worker>`. Its trainer container is
    called `node`; everything else the pods need goes in one patch owned by stagetune, with our labels on the
    pods so the launcher follows them as it follows its own Job's pods."""
    pod.check(nodes, worker)
    labels = run_labels(run)
    pod_patch: dict[str, Any] = {
        "securityContext": pod.pod_security(),
        "volumes": pod.volumes(),
        "containers": [{"name": KUBEFLOW_TRAINER_CONTAINER, "volumeMounts": pod.volume_mounts(),
                        "securityContext": pod.container_security()}],
        "terminationGracePeriodSeconds": GRACE_SECONDS,  # Trainer >= 2.3 (2.2 prunes it: the runtime's then)
        **pod.placement(),
    }
    return {
        "apiVersion": f"{KUBEFLOW_GROUP}/{KUBEFLOW_VERSION}", "kind": "TrainJob",
        "metadata": {"name": run, "namespace": namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"name": runtime, "apiGroup": KUBEFLOW_GROUP, "kind": runtime_kind},
            "trainer": {
                "image": image,
                "command": ["torchrun", *worker],
                "env": pod.variables(),
                "numNodes": nodes,
                "numProcPerNode": max(1, pod.gpus_per_node),
                "resourcesPerNode": pod.resources(),
            },
            "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": KUBEFLOW_TRAINER_JOB, "template": {"spec": {"template": {
                    "metadata": {"labels": labels}, "spec": pod_patch}}}}]}}}}],
        },
    }
