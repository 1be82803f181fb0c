"""Which of SimpleTuner's `report_to` trackers stagetune sends to, and whether this machine can: checked with
the config, before any work (the trainer's trackers live in trainer/trackers.py)."""

from __future__ import annotations

import importlib.util

from stagetune.core.errors import PreconditionError

#: report_to values stagetune sends to → the package each needs.
BUILT = {"tensorboard": "tensorboard", "wandb": "wandb"}


def tracker_names(report_to: str) -> list[str]:
    """The trackers `report_to` asks for that stagetune sends to; `all` is those whose package is installed."""
    if report_to == "all":
        return [name for name, package in BUILT.items() if importlib.util.find_spec(package) is not None]
    return [report_to] if report_to in BUILT else []


def check_trackers(report_to: str) -> None:
    """The package a named tracker needs is installed."""
    for name in tracker_names(report_to):
        if importlib.util.find_spec(BUILT[name]) is None:
            raise PreconditionError(f"report_to={name} needs the {BUILT[name]} package: "
                                    f"pip install 'stagetune[{name}]', or set report_to to none", field="report_to")


def tracker_warning(report_to: str) -> str | None:
    """A line for a report_to that sends nothing here (SimpleTuner's other trackers), or None."""
    if report_to in ("none", *BUILT) or (report_to == "all" and tracker_names("all")):
        return None
    if report_to == "all":
        return "report_to=all: neither tensorboard nor wandb is installed, so nothing is sent to a tracker"
    return (f"report_to={report_to} changes nothing here: stagetune sends to tensorboard and wandb; loss, "
            "learning rate and progress are job events and Prometheus metrics")
