"""`stagetune` command line. Heavy libraries are imported inside commands so `--help` is instant."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any


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
    """One progress bar per phase, fed by the services' Watch events.

    Each message is printed once: a config warning the CLI already printed, or a line two stages both
    log, is not repeated; a job's error is not printed as a log line, since the CLI prints the failure.
    """

    def __init__(self, already_said: list[str] | None = None) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bars: dict[str, object] = {}
        self._said: set[str] = set(already_said or ())

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
            message = event.log.message
            if event.log.level == "error" or message in self._said:
                return
            self._said.add(message)
            self._tqdm.write(f"[{phase}] {message}", file=sys.stderr)
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


#: The exit status of a run stopped by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it).
INTERRUPTED = 130


def cmd_train(args: argparse.Namespace) -> int:
    from stagetune.preflight import prepare_run

    # Everything that can be wrong with the config pair, paths, model, store or output_dir is found here,
    # before torch is imported or a service starts: a typo is answered in about a second.
    remote = _remote(args)
    store = None if remote else _store(args.store)
    plan = prepare_run(Path(args.config), store=store, data_backend_config=args.data_backend_config,
                       lock=not args.check, remote=remote is not None)
    try:
        if remote is not None:
            from stagetune.pipeline import check_endpoints

            check_endpoints(*remote)
        if args.check:
            return _report_check(plan)
        return _train_remote(plan, *remote) if remote is not None else _train(args, plan)
    finally:
        plan.close()


def _remote(args: argparse.Namespace) -> tuple[dict[str, str], Any] | None:
    """--endpoint/--endpoints: the deployment's stage addresses and how to call them; None: embedded."""
    if not args.endpoint and not args.endpoints:
        return None
    from stagetune.core.errors import InputError

    if args.store:
        raise InputError("--store does not apply with --endpoint: a remote deployment uses its own store "
                         "(the chart's S3)", field="store")
    from stagetune.core import security
    from stagetune.pipeline import resolve_endpoints

    env = dict(os.environ)
    for flag, name in (("token_file", security.ENV_TOKEN_FILE), ("tls_ca", security.ENV_TLS_CA),
                       ("tls_client_cert", security.ENV_TLS_CLIENT_CERT),
                       ("tls_client_key", security.ENV_TLS_CLIENT_KEY),
                       ("tls_server_name", security.ENV_TLS_SERVER_NAME)):
        if getattr(args, flag):
            env[name] = getattr(args, flag)
    if args.token_file:
        env.pop(security.ENV_TOKEN, None)  # the flag wins over a token in the environment
    return resolve_endpoints(args.endpoint, args.endpoints), security.ChannelSecurity.from_env(env)


def _train_remote(plan: Any, endpoints: dict[str, str], channel_security: Any) -> int:
    """Drive a deployment's services as the embedded mode drives loopback; nothing heavy is imported here."""
    for warning in plan.cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print("services: " + ", ".join(f"{name} {address}" for name, address in endpoints.items()), file=sys.stderr)
    _stop_cleanly_on_signals()
    from stagetune.pipeline import run_training

    try:
        bars = _Bars(already_said=plan.cfg.warnings)
        run = run_training(plan, endpoints, on_event=bars.event, on_phase=bars.phase_done,
                           channel_options=channel_security)
    except KeyboardInterrupt:
        print("interrupted: the deployment's jobs were cancelled (the trainer after a checkpoint); run the same "
              "command again to resume", file=sys.stderr)
        return INTERRUPTED
    return _summary(plan, run)


def _report_check(plan: Any) -> int:
    """--check: every problem was raised by prepare_run; say what a run would do, and train nothing."""
    cfg = plan.cfg
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    datasets = ", ".join(d.id for d in plan.backends.enabled)
    decision = plan.decision
    if decision is None:
        outcome = "is checked by the deployment's trainer (not reachable from here)"
    elif decision.finished_step is not None:
        outcome = f"already finished at step {decision.finished_step} (raise max_train_steps to train on)"
    elif decision.resume_step is not None:
        outcome = f"resumes checkpoint-{decision.resume_step}"
        if decision.changes:
            outcome += " with changed settings: " + "; ".join(str(c) for c in decision.changes)
    else:
        outcome = "starts a new run"
    print(f"config OK: {cfg.model_family} {cfg.model_type} on {cfg.pretrained_model_name_or_path}, optimizer "
          f"{cfg.optimizer}, datasets {datasets}; {plan.output.url} {outcome}")
    return 0


def _train(args: argparse.Namespace, plan: Any) -> int:
    from stagetune.core.grpc_server import stop_servers
    from stagetune.core.security import ChannelSecurity, ServerSecurity
    from stagetune.models.warmup import warm_imports

    server_security, channel_security = ServerSecurity.from_env(), ChannelSecurity.from_env()
    if args.log_level.upper() != "DEBUG":
        # bitsandbytes (imported by diffusers and peft when installed) announces the CPU kernels it lacks.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for warning in plan.cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    warm_imports(plan.cfg.model_family, quiet=args.log_level.upper() != "DEBUG")  # overlaps ingest
    _stop_cleanly_on_signals()
    from stagetune.pipeline import run_training, start_embedded

    # Job messages reach the terminal as Watch events; the services' own log lines would repeat them.
    logging.getLogger("stagetune.core.jobs").setLevel(logging.ERROR)
    servers = start_embedded(plan.store, security=server_security)
    interrupted = False
    try:
        if args.metrics_port is not None:
            from stagetune.core.metrics import serve_metrics

            print(f"metrics on :{serve_metrics(args.metrics_port)}/metrics", file=sys.stderr)
        endpoints = {name: server.address for name, server in servers.items()}
        bars = _Bars(already_said=plan.cfg.warnings)
        run = run_training(plan, endpoints, on_event=bars.event, on_phase=bars.phase_done,
                           channel_options=channel_security)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: finished shards and the last checkpoint are kept; run the same command again to resume",
              file=sys.stderr)
        return INTERRUPTED
    finally:
        # Interrupted: the stages were cancelled and waited for already (pipeline.run_training); what still
        # runs is stopped with the process (every write is atomic).
        stop_servers(list(servers.values()), 0 if interrupted else 0.5, jobs_timeout=0 if interrupted else None)
    return _summary(plan, run)


def _summary(plan: Any, run: Any) -> int:
    output = plan.output.url.rstrip("/")
    if run.already_finished is not None:
        print(f"\n{output} already holds this run, finished at step {run.already_finished}: nothing to train. "
              "Raise max_train_steps (or num_train_epochs) to train on, or choose another output_dir.")
        return 0
    trained = run.phase("trainer").outputs
    total = sum(p.seconds for p in run.phases)
    steps, new = trained.get("steps"), trained.get("steps_trained", trained.get("steps"))
    resumed = f" (resumed at step {int(steps) - int(new)}, {steps} in all)" if new != steps else ""
    if plan.cfg.model_type == "full":
        made = f"pipeline folder: {output} (diffusers from_pretrained)"
    else:
        made = f"{'LyCORIS' if plan.cfg.lora_type == 'lycoris' else 'LoRA'}: {output}/{trained.get('lora')}"
    print(f"\ntrained {new} steps{resumed} in {total:.1f}s; {made}")
    if run.changed_settings:
        print("settings changed since the checkpoint it resumed: " + "; ".join(run.changed_settings))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from stagetune.core.grpc_server import start_server
    from stagetune.core.metrics import serve_metrics
    from stagetune.core.security import ServerSecurity
    from stagetune.pipeline import DEFAULT_PORTS, service_binding

    port, metrics_port = DEFAULT_PORTS[args.service]
    port = port if args.port is None else args.port
    metrics_port = metrics_port if args.metrics_port is None else args.metrics_port
    security = ServerSecurity.from_env(token_file=args.token_file, cert=args.tls_cert, key=args.tls_key,
                                       client_ca=args.tls_client_ca)
    store = _store(args.store)
    server = start_server([service_binding(args.service, store)], host=args.host, port=port, security=security)
    try:
        metrics_port = serve_metrics(metrics_port, host=args.host)
    except BaseException:
        server.stop(0)
        raise
    auth = ", token required" if security.token else ""
    tls = (", mutual TLS" if security.client_ca else ", TLS") if security.tls else ""
    print(f"{args.service} serving gRPC on {args.host}:{server.port}{tls}{auth}, metrics on :{metrics_port}/metrics",
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
    from stagetune.core.errors import InputError
    from stagetune.models.tiny import build_tiny

    if args.output and args.output_flag and args.output != args.output_flag:
        raise InputError(f"two output folders given: {args.output} and --output {args.output_flag}", field="output")
    output = args.output or args.output_flag
    if not output:
        raise InputError(f"tiny-model needs an output folder: stagetune tiny-model {args.family} [--size SIZE] OUT",
                         field="output")
    print(build_tiny(args.family, Path(output), seed=args.seed, size=args.size))
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from stagetune.examples import write_example

    config = write_example(args.family, Path(args.output), steps=args.steps)
    print(f"wrote {config}; train it with: stagetune train --config {config}")
    return 0


SERVE_EPILOG = """default ports (all five services can run on one host):
  ingest 50051 (metrics 9471), vae 50052 (9472), text 50053 (9473), trainer 50054 (9474), validation 50055 (9475)
environment: STAGETUNE_STORE, STAGETUNE_API_TOKEN[_FILE], STAGETUNE_TLS_CERT/_KEY/_CLIENT_CA; clients:
  STAGETUNE_TLS_CA, STAGETUNE_TLS_CLIENT_CERT/_KEY, STAGETUNE_TLS_SERVER_NAME"""


TRAIN_EPILOG = """with --endpoint the services of a deployment do the work: every dataset must be in S3
(type: aws) and output_dir an s3:// URL this machine and the cluster both reach; the model is a hub id or
a path on the cluster."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagetune", description=__doc__.split(".")[0] if __doc__ else None)
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train: all five services on loopback, or a deployment's (--endpoint)",
                           epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", required=True, help="SimpleTuner config.json")
    train.add_argument("--data_backend_config", "--data-backend-config", default=None,
                       help="multidatabackend.json (default: the config's data_backend_config)")
    train.add_argument("--store", default=None, help="object store: a folder or s3://bucket?endpoint=…")
    train.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    train.add_argument("--check", action="store_true",
                       help="check the config pair, paths, model, store and output_dir; report every problem and "
                            "what a run would do, without training")
    remote = train.add_argument_group("a remote deployment (the Helm chart's services)")
    remote.add_argument("--endpoint", default=None, metavar="HOST[:PORT]",
                        help="the deployment's host: ingest at PORT (default 50051), vae, text and trainer on the "
                             "next three ports, as the chart serves them")
    remote.add_argument("--endpoints", default=None, metavar="STAGE=HOST:PORT,…",
                        help="stages at other addresses (ingest, vae, text, trainer; validation=… is passed to the "
                             "trainer, which otherwise uses its own STAGETUNE_VALIDATION_ENDPOINT)")
    remote.add_argument("--token-file", default=None, help="send this bearer token (or STAGETUNE_API_TOKEN[_FILE])")
    remote.add_argument("--tls-ca", default=None, help="speak TLS, trusting this CA (or STAGETUNE_TLS_CA)")
    remote.add_argument("--tls-client-cert", default=None, help="client certificate for mutual TLS")
    remote.add_argument("--tls-client-key", default=None, help="… and its key")
    remote.add_argument("--tls-server-name", default=None, help="the name expected in the servers' certificates")
    train.set_defaults(func=cmd_train)

    serve = sub.add_parser("serve", help="run one service", epilog=SERVE_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("service", choices=["ingest", "vae", "text", "trainer", "validation"])
    serve.add_argument("--port", type=int, default=None, help="gRPC port (default: 50051-50055 by service; 0: any)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="Prometheus port (default: 9471-9475 by service; 0: any)")
    serve.add_argument("--store", default=None, help="object store: a folder or s3://bucket?endpoint=…")
    serve.add_argument("--token-file", default=None,
                       help="require this bearer token (a file, e.g. a mounted Secret; or STAGETUNE_API_TOKEN)")
    serve.add_argument("--tls-cert", default=None, help="serve TLS with this PEM certificate chain")
    serve.add_argument("--tls-key", default=None, help="… and this PEM private key")
    serve.add_argument("--tls-client-ca", default=None, help="require client certificates from this CA (mutual TLS)")
    serve.set_defaults(func=cmd_serve)

    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight model in diffusers format")
    tiny.add_argument("family", choices=["sd3", "sana"])
    tiny.add_argument("output", nargs="?", default=None, help="the folder to write (must not exist or be empty)")
    tiny.add_argument("--output", dest="output_flag", default=None, help="the same, as an option")
    tiny.add_argument("--size", choices=["tiny", "compute"], default="tiny",
                      help="tiny: toy widths, for tests (default); compute: a 6 × 768 MMDiT whose training step is "
                           "compute-bound on a CPU (256 px), for benchmarks")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny_model)
    # `tiny-model sd3 --size compute OUT`: before Python 3.12, argparse matches the optional OUT (empty) together
    # with `sd3`, so an OUT after an option would be refused; intermixed parsing takes it wherever it stands.
    plain_parse = tiny.parse_known_args

    def parse_intermixed(args=None, namespace=None):  # noqa: ANN001, ANN202 - argparse's own signature
        tiny.parse_known_args = plain_parse  # what parse_known_intermixed_args calls back
        try:
            return tiny.parse_known_intermixed_args(args, namespace)
        finally:
            tiny.parse_known_args = parse_intermixed

    tiny.parse_known_args = parse_intermixed

    example = sub.add_parser("example", help="write a ready-to-train example: tiny model, photos, configs")
    example.add_argument("family", choices=["sd3", "sana"])
    example.add_argument("output")
    example.add_argument("--steps", type=int, default=20)
    example.set_defaults(func=cmd_example)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from stagetune.core.errors import StagetuneError

    try:
        code = args.func(args)
    except StagetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if code == INTERRUPTED:
        # Everything worth keeping is written (atomically) and the output_dir's lock is released. Tearing
        # down torch, gRPC and the stopped jobs' threads in the interpreter's exit took seconds: skip it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
