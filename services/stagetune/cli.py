"""`stagetune` command line. Heavy libraries are imported inside commands so `--help` is instant."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _store(url: str | None):  # noqa: ANN202 - imported lazily
    import os

    from stagetune.core.store import default_store_url, open_store

    store = open_store(url)
    if not url and not os.environ.get("STAGETUNE_STORE"):
        print(f"store: {default_store_url()} (the default; set --store or STAGETUNE_STORE to change)",
              file=sys.stderr)
    else:
        print(f"store: {store.url}", file=sys.stderr)
    return store


class _Bars:
    """One progress bar per phase, fed by the services' Watch events."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bars: dict[str, object] = {}

    def event(self, phase: str, event) -> None:  # noqa: ANN001
        kind = event.WhichOneof("body")
        if kind == "progress":
            p = event.progress
            bar = self._bars.get(phase)
            if bar is None or bar.desc != f"{phase}: {p.phase}":
                if bar is not None:
                    bar.close()
                bar = self._tqdm(total=p.total or None, desc=f"{phase}: {p.phase}", unit=p.unit or "it",
                                 file=sys.stderr, dynamic_ncols=True, leave=False)
                self._bars[phase] = bar
            if p.total and bar.total != p.total:
                bar.total = p.total
            bar.n = p.done
            bar.refresh()
        elif kind == "log":
            self._tqdm.write(f"[{phase}] {event.log.message}", file=sys.stderr)
        elif kind == "metric" and event.metric.name == "loss":
            bar = self._bars.get(phase)
            if bar is not None:
                bar.set_postfix(loss=f"{event.metric.value:.4f}", refresh=False)

    def phase_done(self, result) -> None:  # noqa: ANN001
        bar = self._bars.pop(result.name, None)
        if bar is not None:
            bar.close()
        print(f"{result.name:<8} done in {result.seconds:6.1f}s  {_describe(result)}", file=sys.stderr)


def _describe(result) -> str:  # noqa: ANN001
    o = result.outputs
    if result.name == "ingest":
        return f"{o.get('samples')} samples, {o.get('captions')} captions, manifest {o.get('manifest_id', '')[:12]}"
    if result.name in ("vae", "text"):
        what = "latents" if result.name == "vae" else "embeddings"
        if o.get("encoded") == "0":
            return f"all {o.get('total')} {what} were cache hits: nothing encoded"
        shared = f", {o['shared']} by other replicas" if o.get("shared") not in (None, "", "0") else ""
        return f"{o.get('encoded')} {what} encoded, {o.get('hits')} cache hits{shared}"
    if result.name == "trainer":
        return f"{o.get('steps')} steps, {o.get('validation_images', 0)} validation images"
    return ""


def _quiet_libraries(level: str) -> None:
    """Our progress bars and messages only: the libraries' own bars and notices drown them."""
    if level.upper() == "DEBUG":
        return
    import warnings

    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")


def _stop_cleanly_on_signals() -> None:
    """Ctrl-C and SIGTERM (what Kubernetes sends) both mean: save a checkpoint, then stop.

    Installed explicitly because a process started in the background by a non-interactive shell
    inherits SIGINT as ignored, and Python keeps that.
    """
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def cmd_train(args: argparse.Namespace) -> int:
    from stagetune.models.warmup import warm_imports
    from stagetune.pipeline import run_training, start_embedded

    warm_imports()  # overlaps the model libraries' import with ingest
    _quiet_libraries(args.log_level)
    _stop_cleanly_on_signals()
    # Job messages reach the terminal as Watch events; the services' own log lines would repeat them.
    logging.getLogger("stagetune.core.jobs").setLevel(logging.ERROR)

    store = _store(args.store)
    servers = start_embedded(store)
    if args.metrics_port is not None:
        from stagetune.core.metrics import serve_metrics

        print(f"metrics on :{serve_metrics(args.metrics_port)}/metrics", file=sys.stderr)
    endpoints = {name: server.address for name, server in servers.items()}
    bars = _Bars()
    try:
        run = run_training(Path(args.config), endpoints, data_backend_config=args.data_backend_config,
                           on_event=bars.event, on_phase=bars.phase_done)
    except KeyboardInterrupt:
        print("interrupted: checkpoints are saved; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        for server in servers.values():
            server.stop(0.5)
    trained = run.phase("trainer").outputs
    total = sum(p.seconds for p in run.phases)
    print(f"\ntrained {trained.get('steps')} steps in {total:.1f}s; "
          f"LoRA: {trained.get('output', '').rstrip('/')}/{trained.get('lora')}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from stagetune.core.grpc_server import start_server
    from stagetune.core.metrics import serve_metrics
    from stagetune.pipeline import service_binding

    store = _store(args.store)
    server = start_server([service_binding(args.service, store)], host=args.host, port=args.port)
    metrics_port = serve_metrics(args.metrics_port, host=args.host)
    print(f"{args.service} serving gRPC on {args.host}:{server.port}, metrics on :{metrics_port}/metrics",
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop(5)
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from stagetune.models.sd3.tiny import build_tiny_sd3

    if args.family != "sd3":
        from stagetune.core.errors import NotSupportedError

        raise NotSupportedError(f"not supported yet: tiny-model {args.family}", field="family")
    path = build_tiny_sd3(Path(args.output), seed=args.seed)
    print(path)
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from stagetune.examples import write_example

    config = write_example(args.family, Path(args.output), steps=args.steps)
    print(f"wrote {config}; train it with: stagetune train --config {config}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagetune", description=__doc__.split(".")[0] if __doc__ else None)
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train on one machine: all five services on loopback")
    train.add_argument("--config", required=True, help="SimpleTuner config.json")
    train.add_argument("--data_backend_config", "--data-backend-config", default=None,
                       help="multidatabackend.json (default: the config's data_backend_config)")
    train.add_argument("--store", default=None, help="object store: a folder or s3://bucket?endpoint=…")
    train.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    train.set_defaults(func=cmd_train)

    serve = sub.add_parser("serve", help="run one service")
    serve.add_argument("service", choices=["ingest", "vae", "text", "trainer", "validation"])
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--metrics-port", type=int, default=9090)
    serve.add_argument("--store", default=None, help="object store: a folder or s3://bucket?endpoint=…")
    serve.set_defaults(func=cmd_serve)

    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight model in diffusers format")
    tiny.add_argument("family", choices=["sd3"])
    tiny.add_argument("--output", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny_model)

    example = sub.add_parser("example", help="write a ready-to-train example: tiny model, photos, configs")
    example.add_argument("family", choices=["sd3"])
    example.add_argument("output")
    example.add_argument("--steps", type=int, default=20)
    example.set_defaults(func=cmd_example)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from stagetune.core.errors import StagetuneError

    try:
        return args.func(args)
    except StagetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
