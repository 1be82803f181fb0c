"""Prometheus metrics every service exposes.

Names follow ops-facts.md: the common gRPC server names so stock dashboards work, our own under
`stagetune_` in base units, labels bounded (service, method, code, stage — never job ids).
In the embedded mode the five servers share one process and so one registry and one HTTP port.
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from stagetune.core.errors import PortInUseError

GRPC_STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_service", "grpc_method"]
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to complete an RPC (streams: until the stream ends).",
    ["grpc_service", "grpc_method"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600),
)
JOBS = Counter("stagetune_jobs_total", "Jobs that reached a final state.", ["service", "state"])
# Queue depth and what is running now: the "training stalled" alert needs a running trainer job to compare with.
ACTIVE_JOBS = Gauge("stagetune_active_jobs", "Jobs queued or running now.", ["service", "state"])
STORE_BYTES = Counter("stagetune_store_bytes_total", "Bytes written to and read from the S3 store.", ["direction"])
STORE_ERRORS = Counter("stagetune_store_errors_total", "S3 store requests that failed after their retries.",
                       ["operation"])
LEASE_TAKEOVERS = Counter("stagetune_lease_takeovers_total",
                          "Work units taken over from a replica whose lease expired.", ["stage"])
ITEMS_ENCODED = Counter("stagetune_cache_items_encoded_total", "Cache entries computed.", ["stage"])
CACHE_HITS = Counter("stagetune_cache_hits_total", "Cache entries found already computed.", ["stage"])
CACHE_BYTES = Counter("stagetune_cache_written_bytes_total", "Bytes written to caches.", ["stage"])
BATCH_SECONDS = Histogram(
    "stagetune_encode_batch_seconds",
    "Time to encode one batch.",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60),
)
TRAIN_STEPS = Counter("stagetune_train_steps_total", "Optimizer steps taken.", ["model_family"])
TRAIN_STEP_SECONDS = Histogram(
    "stagetune_train_step_seconds",
    "Wall time of one optimizer step.",
    ["model_family"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
TRAIN_DATA_WAIT_SECONDS = Histogram(
    "stagetune_train_data_wait_seconds",
    "Time an optimizer step waited for its batches (zero when reading ahead keeps up).",
    ["model_family"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
TRAIN_LOSS = Histogram(
    "stagetune_train_loss", "Training loss per step.", ["model_family"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)

TRAIN_SAMPLES = Counter("stagetune_train_samples_total", "Training samples consumed by optimizer steps.",
                        ["model_family"])
TRAIN_LEARNING_RATE = Gauge("stagetune_train_learning_rate", "Learning rate of the latest optimizer step.",
                            ["model_family"])
GPU_MEMORY_PEAK = Gauge("stagetune_gpu_memory_peak_bytes", "Peak GPU memory torch allocated in this process.",
                        ["stage"])

_http_lock = threading.Lock()
_http_port: int | None = None


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Serve /metrics once per process; later calls return the port already serving."""
    global _http_port
    with _http_lock:
        if _http_port is None:
            try:
                server, _ = start_http_server(port, addr=host, registry=REGISTRY)
            except OSError as exc:
                raise PortInUseError(
                    f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} (pass --metrics-port with a "
                    "free port, or 0 for any)", field="metrics_port") from None
            _http_port = server.server_port
        return _http_port


def record_train_step(family: str, seconds: float, loss: float, data_wait: float, lr: float, samples: int,
                      gpu_peak_bytes: float | None = None) -> None:
    """One optimizer step in the training metrics (the trainer's own, or relayed from its rank-0 worker)."""
    TRAIN_STEPS.labels(family).inc()
    TRAIN_STEP_SECONDS.labels(family).observe(seconds)
    TRAIN_LOSS.labels(family).observe(loss)
    TRAIN_DATA_WAIT_SECONDS.labels(family).observe(data_wait)
    TRAIN_SAMPLES.labels(family).inc(samples)
    TRAIN_LEARNING_RATE.labels(family).set(lr)
    if gpu_peak_bytes is not None:
        GPU_MEMORY_PEAK.labels("trainer").set(gpu_peak_bytes)
