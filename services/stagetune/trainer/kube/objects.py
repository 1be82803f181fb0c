"""The Kubernetes objects of one multi-node training run, as plain dicts (what the API server takes).

An Indexed Job runs one pod per node; pod i is `<run>-<i>.<run>` through the headless Service, so every
node finds node 0 for torchrun's c10d rendezvous without an operator. The Service publishes pods before
they are ready, because the rendezvous happens before any readiness could be reported.
"""

from __future__ import annotations

from typing import Any

from stagetune.trainer.kube.profiles import GpuProfile

RDZV_PORT = 29400
RUN_LABEL = "stagetune.io/training-run"
#: The component label of training pods: the chart's NetworkPolicies select them by it.
TRAINING_COMPONENT = "training-run"


#: Where the chart mounts the S3 CA bundle in the services (its store URL names a file here).
S3_CA_DIR = "/etc/stagetune/s3-ca"


def image_for(repository: str, tag: str, profile: GpuProfile) -> str:
    """The image variant a profile needs (the chart's rule: <repository>:<tag>-<cuda|rocm>)."""
    return f"{repository}:{tag}-{profile.image}"


def torchrun_command(run: str, nodes: int, gpus_per_node: int, worker: list[str]) -> list[str]:
    """torchrun with c10d rendezvous at node 0; the worker command is the caller's (its module and args)."""
    return ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={gpus_per_node}",
            "--node-rank=$(JOB_COMPLETION_INDEX)", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={run}-0.{run}:{RDZV_PORT}", f"--rdzv-id={run}", *worker]


def training_objects(*, run: str, namespace: str, profile: GpuProfile, nodes: int, gpus_per_node: int,
                     image: str, worker: list[str], store_url: str, secret_name: str,
                     env: dict[str, str] | None = None, secret_env: dict[str, str] | None = None,
                     memory: str = "64Gi", shm_size: str = "32Gi",
                     service_account: str | None = None, uid: int = 10001,
                     s3_ca: tuple[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Job, headless Service) for `nodes` pods of `gpus_per_node` GPUs each on `profile`'s nodes.

    `secret_env` maps variables to keys of `secret_name` (the API token rank 0 calls validation with), so no
    secret is ever written into the Job's spec. `s3_ca` (ConfigMap, key) mounts the S3 CA bundle where the
    services have it (`S3_CA_DIR`), so the same store URL (`ca_bundle=…`) works in the training pods."""
    if nodes < 1 or gpus_per_node < (0 if profile.resource is None else 1):
        raise ValueError(f"{nodes} node(s) x {gpus_per_node} GPU(s) on {profile.name}: need >= 1 node and, "
                         "on a GPU profile, >= 1 GPU per node")
    if not worker:
        raise ValueError("the worker command is empty")
    labels = {"app.kubernetes.io/name": "stagetune", "app.kubernetes.io/component": TRAINING_COMPONENT,
              RUN_LABEL: run}
    limits: dict[str, str] = {"memory": memory}
    if profile.resource:
        limits[profile.resource] = str(gpus_per_node)  # a quantity: the API client insists on a string
    variables = [
        # Set explicitly so $(JOB_COMPLETION_INDEX) in the command expands on every Kubernetes version.
        {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "STAGETUNE_STORE", "value": store_url},
        {"name": "STAGETUNE_S3_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": secret_name,
                                                                           "key": "s3-access-key"}}},
        {"name": "STAGETUNE_S3_SECRET_KEY", "valueFrom": {"secretKeyRef": {"name": secret_name,
                                                                           "key": "s3-secret-key"}}},
        {"name": "HOME", "value": "/cache"}, {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"}, {"name": "TMPDIR", "value": "/tmp"},
        *({"name": k, "value": v} for k, v in sorted((env or {}).items())),
        *({"name": k, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}
          for k, key in sorted((secret_env or {}).items())),
    ]
    pod_spec: dict[str, Any] = {
        "subdomain": run,  # <run>-<i>.<run> resolves through the headless Service
        "restartPolicy": "Never",
        # Cancel deletes the Job: SIGTERM makes every rank stop at the same step and rank 0 save a checkpoint,
        # which needs as long as the trainer's own (the chart's trainer.terminationGracePeriodSeconds).
        "terminationGracePeriodSeconds": 900,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid, "runAsNonRoot": True,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": profile.node_expressions()}]}}},
        "containers": [{
            "name": "worker",
            "image": image,
            "command": torchrun_command(run, nodes, gpus_per_node, worker),
            "env": variables,
            "ports": [{"name": "c10d", "containerPort": RDZV_PORT, "protocol": "TCP"}],
            "resources": {"limits": limits, "requests": dict(limits)},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "cache", "mountPath": "/cache"},
                             {"name": "tmp", "mountPath": "/tmp"}],
        }],
        # NCCL/RCCL and the data loaders share memory through /dev/shm; the runtime's default is 64 MiB.
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
                    {"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}],
    }
    if s3_ca is not None:
        config_map, key = s3_ca
        pod_spec["containers"][0]["volumeMounts"].append({"name": "s3-ca", "mountPath": S3_CA_DIR, "readOnly": True})
        pod_spec["volumes"].append({"name": "s3-ca", "configMap": {"name": config_map,
                                                                   "items": [{"key": key, "path": key}]}})
    if profile.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in profile.tolerations]
    if service_account:
        pod_spec["serviceAccountName"] = service_account
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
