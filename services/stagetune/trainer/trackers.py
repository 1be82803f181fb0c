"""SimpleTuner's `report_to`: the training scalars and validation images sent to TensorBoard and/or Weights &
Biases, through accelerate's trackers (the ones SimpleTuner uses, so runs look the same on both).

Where things go, as SimpleTuner puts them: `logging_dir` (default `logs`) relative to `output_dir`;
TensorBoard writes under `logging_dir/tracker_project_name`; W&B uses `tracker_project_name` as its project
and `tracker_run_name` as the run's name, with its files under `logging_dir`. `WANDB_MODE=offline` logs with
no network (`wandb sync` uploads later). With an `s3://` output_dir the files are written to a local folder
and copied under `output_dir/logging_dir` at every checkpoint and at the end.

A resumed run continues the same W&B run (its id is kept in the output's `.stagetune/trackers.json`), and
TensorBoard drops events a killed run logged after the checkpoint it resumes from, so curves do not fold back.

Validation images arrive after training has moved on (validation runs beside it). TensorBoard takes them at
their own step; W&B, whose steps only go forward, gets them against a `validation_step` axis.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stagetune.core.config.trackers import check_trackers, tracker_names
from stagetune.core.errors import UnavailableError
from stagetune.core.store.base import Store

IDS_FILE = ".stagetune/trackers.json"


class Trackers:
    """The run's trackers: `log` per step, `log_images` when validation finishes, `sync` and `finish`."""

    def __init__(self, trackers: list[Any], local_dir: Path, output: Store, output_dir: str | None) -> None:
        self.trackers = trackers
        self.local_dir = local_dir
        self.output = output
        self.output_dir = output_dir  # where `sync` copies the files in output, when they are not there already

    @classmethod
    def start(cls, cfg: Any, output: Store, *, resumed_step: int, settings: Mapping[str, Any]) -> Trackers | None:
        names = tracker_names(cfg.report_to)
        if not names:
            return None
        check_trackers(cfg.report_to)
        local_dir, output_dir = _logging_dir(cfg.logging_dir, output)
        trackers = []
        for name in names:
            tracker = _make(name, cfg, local_dir, _run_id(output, name), resumed_step)
            try:
                tracker.start()
            except Exception as exc:  # noqa: BLE001 - any failure to open a run is the same error to the user
                raise UnavailableError(f"report_to={name}: could not start a run: {exc}"
                                       + ("; set WANDB_MODE=offline to log without a network" if name == "wandb"
                                          else ""), field="report_to") from exc
            tracker.store_init_configuration(_plain(settings))
            trackers.append(tracker)
        return cls(trackers, local_dir, output, output_dir)

    def log(self, values: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(dict(values), step=step)

    def log_images(self, images: Mapping[str, bytes], step: int) -> None:
        """PNG bytes by name, sampled at training step `step`."""
        import numpy as np
        from PIL import Image

        arrays = {name: np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for name, png in images.items()}
        for tracker in self.trackers:
            if tracker.name == "wandb":
                import wandb

                tracker.run.log({"validation_step": step,
                                 **{f"validation/{name}": wandb.Image(array) for name, array in arrays.items()}})
            else:
                for name, array in arrays.items():
                    tracker.writer.add_image(f"validation/{name}", array, global_step=step, dataformats="HWC")

    def sync(self) -> None:
        """Copy the tracker files under output_dir when they are written elsewhere (an s3:// output_dir)."""
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.flush()
        if self.output_dir is None:
            return
        for path in sorted(p for p in self.local_dir.rglob("*") if p.is_file()):
            self.output.put_bytes(f"{self.output_dir}/{path.relative_to(self.local_dir).as_posix()}",
                                  path.read_bytes())

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.sync()
        if self.output_dir is not None:  # the local copy of a remote output's logs
            shutil.rmtree(self.local_dir, ignore_errors=True)


def _make(name: str, cfg: Any, local_dir: Path, run_id: str, resumed_step: int) -> Any:
    from accelerate import PartialState
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    # accelerate's trackers log through its process-aware logger, which refuses to run before its state
    # exists; SimpleTuner has it from its Accelerator. Without it a run failed or not by test order.
    PartialState()

    if name == "tensorboard":
        # purge_step: a resumed run drops what the killed one logged after its checkpoint
        return TensorBoardTracker(cfg.tracker_project_name, str(local_dir),
                                  **({"purge_step": resumed_step} if resumed_step else {}))
    local_dir.mkdir(parents=True, exist_ok=True)
    tracker = WandBTracker(cfg.tracker_project_name, name=cfg.tracker_run_name, dir=str(local_dir), id=run_id,
                           resume="allow")
    return _WandBWithImages(tracker)


class _WandBWithImages:
    """accelerate's W&B tracker, with validation images on their own step axis (define_metric after start)."""

    name = "wandb"

    def __init__(self, tracker: Any) -> None:
        self._tracker = tracker

    def start(self) -> None:
        self._tracker.start()
        self.run.define_metric("validation_step")
        self.run.define_metric("validation/*", step_metric="validation_step")

    @property
    def run(self) -> Any:
        return self._tracker.run

    def store_init_configuration(self, values: dict) -> None:
        self._tracker.store_init_configuration(values)

    def log(self, values: dict, step: int) -> None:
        self._tracker.log(values, step=step)

    def finish(self) -> None:
        self._tracker.finish()


def _logging_dir(logging_dir: str, output: Store) -> tuple[Path, str | None]:
    """(local folder the trackers write, folder in output to copy it to or None): SimpleTuner's
    `output_dir/logging_dir`, or `logging_dir` itself when it is absolute."""
    path = Path(logging_dir).expanduser()
    if path.is_absolute():
        return path, None
    local = output.local_path(path.as_posix())
    if local is not None:
        return local, None
    return Path(tempfile.mkdtemp(prefix="stagetune-logs-")), path.as_posix()


def _run_id(output: Store, name: str) -> str:
    """The tracker's run id for this output_dir: kept, so a resumed run continues the same tracker run."""
    ids: dict[str, str] = {}
    if output.exists(IDS_FILE):
        ids = json.loads(output.get_bytes(IDS_FILE))
    if name not in ids:
        ids[name] = uuid.uuid4().hex[:16]
        output.put_bytes(IDS_FILE, json.dumps(ids, indent=1).encode())
    return ids[name]


def _plain(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters as trackers take them: bool, int, float or str (lists and dicts as JSON)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if value is None or isinstance(value, bool | int | float | str):
            out[key] = "" if value is None else value
        else:
            out[key] = json.dumps(value, default=str, sort_keys=True)
    return out
