"""Everything `stagetune train` checks before it imports torch or starts a service.

A typo, a missing folder, an unreachable store or a read-only output_dir is answered in about a second,
all problems at once, each printed once. Then the output_dir's run lock is taken (a second run on the
same output_dir fails here), and what the output_dir already holds is compared with this run's settings
(core/run_settings.py), so another run's checkpoints are never resumed as ours.

Pure Python and the store client only: nothing here may import torch, diffusers or grpc.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from stagetune.core import checks
from stagetune.core.config.dataset import DataBackends, load_data_backend_config
from stagetune.core.config.files import read_json_file
from stagetune.core.config.keys import normalise_key
from stagetune.core.config.train import TrainConfig, load_train_config
from stagetune.core.errors import Collector, ConfigError, NotWritableError, StagetuneError, StoreUnavailableError
from stagetune.core.outputs import open_output
from stagetune.core.run_lock import LOCK_PREFIX, RunLock
from stagetune.core.run_settings import Decision, OutputState, config_settings, decide, read_output_state
from stagetune.core.store.base import Store


@dataclasses.dataclass
class RunPlan:
    """A checked run: its configs, stores and the output_dir lock it holds until `close`."""

    config_path: Path
    raw_config: dict[str, Any]
    cfg: TrainConfig
    backends: DataBackends
    backends_json: str
    base_dir: Path
    store: Store | None
    output: Store
    lock: RunLock | None
    #: None for a remote run whose output_dir this machine cannot reach: the deployment's trainer takes the
    #: lock and checks what output_dir holds (trainer/service.py), after ingest and encoding instead of before.
    output_state: OutputState | None
    decision: Decision | None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def read_config_file(path: Path, what: str = "config") -> Any:
    return read_json_file(path, what=f"{what} file", field=what)


def find_data_backend_config(raw: dict[str, Any], explicit: str | None, config_path: Path, base_dir: Path) -> Path:
    """--data_backend_config, else the config's key, else multidatabackend.json beside config.json."""
    given = {normalise_key(k): v for k, v in raw.items()}.get("data_backend_config")
    candidate = explicit or (given if isinstance(given, str) and given.strip() else None)
    if not candidate:
        default = config_path.parent / "multidatabackend.json"
        if default.exists():
            return default
        raise ConfigError("no data_backend_config: set it in config.json or pass --data_backend_config",
                          field="data_backend_config")
    path = Path(candidate).expanduser()
    if path.is_absolute():
        return path
    for base in (base_dir, config_path.parent, config_path.parent.parent):  # as SimpleTuner, then beside config
        if (base / path).exists():
            return base / path
    return base_dir / path


def prepare_run(config_path: Path | str, *, store: Store | None, data_backend_config: str | None = None,
                base_dir: Path | None = None, lock: bool = True, remote: bool = False) -> RunPlan:
    """Check the whole config pair, paths, model, store and output_dir; take the output_dir's run lock.

    `remote`: the services run elsewhere (`stagetune train --endpoint`) and read nothing from this machine,
    so every dataset must be in S3 and output_dir an s3:// URL; the model is the services' to check, and so is
    output_dir when this machine cannot reach it (its lock and state are then the trainer's to take and read).
    """
    config_path = Path(config_path)
    base = Path(base_dir) if base_dir is not None else Path(os.getcwd())
    problems = Collector()
    raw = read_config_file(config_path)
    if not isinstance(raw, dict):
        load_train_config(config_path)  # raises the error that names what the file holds
    cfg = backends = backends_json = None
    with problems.check():
        cfg = load_train_config(raw, base_dir=base)
    with problems.check():
        backends_path = find_data_backend_config(raw, data_backend_config, config_path, base)
        entries = read_config_file(backends_path, "data_backend_config")
        backends = load_data_backend_config(entries, defaults=cfg.dataset_defaults() if cfg else {}, base_dir=base)
        backends_json = json.dumps(entries)
    # The model is checked even when config.json has other problems: all of them are reported in one go.
    given = {normalise_key(k): v for k, v in raw.items()}
    model = cfg.pretrained_model_name_or_path if cfg is not None else given.get("pretrained_model_name_or_path")
    if isinstance(model, str) and model.strip() and "{env:" not in model and not remote:
        with problems.check():
            checks.check_model_source(model, revision=cfg.revision if cfg is not None else None)
    if remote:
        for problem in remote_problems(cfg, backends):
            problems.add(problem)
    for dataset in backends.read if backends is not None and not remote else ():
        if dataset.instance_data_dir is not None:
            with problems.check():
                checks.check_dataset_folder(dataset.id, dataset.instance_data_dir)
    if store is not None:  # None: the services' store is not ours to reach (they check it themselves)
        with problems.check():
            checks.probe_store(store)
    if cfg is not None and "://" not in str(cfg.output_dir) and not remote:
        with problems.check():
            checks.check_local_output(Path(cfg.output_dir))
    problems.raise_if_any()
    assert cfg is not None and backends is not None and backends_json is not None
    # The run's lock is machine 0's: the other machines of a multi-machine run train their ranks beside it and
    # write nothing to output_dir (rank 0 does).
    unreachable = _unreachable(open_output(cfg.output_dir, base)) if remote else None
    if unreachable is not None:
        # A cluster-internal S3 (the chart's bundled server, say) is the deployment's to reach, not ours.
        output, run_lock, state, decision = open_output(cfg.output_dir, base), None, None, None
        cfg.warnings.append(f"output_dir {output.url} cannot be reached from this machine ({unreachable}); the "
                            "deployment's trainer takes the run's lock and checks what output_dir holds when "
                            "training starts")
    else:
        output, run_lock, state, decision = open_checked_output(cfg, base, take_lock=lock and cfg.machine_rank == 0)
    return RunPlan(config_path, raw, cfg, backends, backends_json, base, store, output, run_lock, state, decision)


def remote_problems(cfg: TrainConfig | None, backends: DataBackends | None) -> list[StagetuneError]:
    """What a remote deployment could not read or write: local datasets, a local output_dir. Its pods see
    neither this machine's folders nor its paths, so each is refused by name before anything starts."""
    problems: list[StagetuneError] = []
    for dataset in backends.read if backends is not None else ():
        if dataset.type != "aws":
            problems.append(ConfigError(
                f"dataset {dataset.id!r} is a local folder ({dataset.instance_data_dir}), which the services of a "
                "remote deployment cannot read: datasets on a cluster live in S3. Upload it and set type: aws with "
                "aws_bucket_name, aws_data_prefix (and aws_endpoint_url, aws_* credentials) in multidatabackend.json",
                field="instance_data_dir"))
    if cfg is not None and not str(cfg.output_dir).startswith("s3://"):
        problems.append(ConfigError(
            f"output_dir {cfg.output_dir} is not an s3:// URL: a remote deployment writes checkpoints and weights "
            "to S3. Give s3://bucket/prefix?endpoint=… as the cluster reaches it (where this machine reaches it "
            "too, it holds the run's lock and checks output_dir before any encoding)", field="output_dir"))
    return problems


def _unreachable(output: Store) -> StoreUnavailableError | None:
    """Whether this machine reaches a remote run's output_dir at all, in one try: a cluster-internal address
    fails at once here rather than after the store's backoff (which stays for every later call)."""
    retries = getattr(output, "retries", None)
    if retries is None:  # not a network store
        return None
    output.retries = 0
    try:
        output.exists(f"{LOCK_PREFIX}/reachable")
    except StoreUnavailableError as exc:
        return exc
    finally:
        output.retries = retries
    return None


def open_checked_output(cfg: TrainConfig, base_dir: Path, *, take_lock: bool = True
                        ) -> tuple[Store, RunLock | None, OutputState, Decision]:
    """Open output_dir, take its run lock, and refuse another run's outputs (before ingest)."""
    output = open_output(cfg.output_dir, base_dir)
    run_lock = None
    try:
        if take_lock:
            try:
                run_lock = RunLock(output).acquire()
            except NotWritableError as exc:
                raise NotWritableError(f"output_dir {output.url} cannot be written: {exc}",
                                       field="output_dir") from None
        state = read_output_state(output)
        decision = decide(state, config_settings(cfg), resume_from_checkpoint=cfg.resume_from_checkpoint)
    except StagetuneError:
        if run_lock is not None:
            run_lock.release()
        raise
    return output, run_lock, state, decision
