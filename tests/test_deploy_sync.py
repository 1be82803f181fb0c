"""deploy/ holds the chart rendered for the example profiles plus its dashboards and alert rules as plain
files; they must be exactly what `python deploy/render.py` writes from the chart today."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("helm_python")

ROOT = Path(__file__).resolve().parents[1]


def _render_module():  # noqa: ANN202 - a module loaded from a path
    spec = importlib.util.spec_from_file_location("deploy_render", ROOT / "deploy" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deploy_is_in_sync_with_the_chart() -> None:
    stale = _render_module().stale_files()
    assert stale == [], f"deploy/ is out of date ({', '.join(stale)}): run `python deploy/render.py`"


def test_examples_cover_every_profile() -> None:
    profiles = set()
    for example in (ROOT / "deploy" / "examples").glob("*.yaml"):
        values = yaml.safe_load(example.read_text())
        profiles |= {values[s]["gpu"]["profile"] for s in ("vae", "text", "trainer", "validation") if s in values}
    assert profiles == {"h100", "h200", "b200", "gb200", "mi300x", "cpu"}


def test_check_mode_notices_an_edit(tmp_path: Path) -> None:
    """The sync check is not vacuous: a copy of deploy/ with one edited manifest is reported."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "deploy", copy / "deploy")
    shutil.copytree(ROOT / "charts", copy / "charts")
    edited = copy / "deploy" / "manifests" / "h100.yaml"
    edited.write_text(edited.read_text().replace("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100", 1))
    (copy / "deploy" / "manifests" / "old-example.yaml").write_text("---\n")
    result = subprocess.run([sys.executable, str(copy / "deploy" / "render.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["out of date: deploy/manifests/h100.yaml",
                                          "out of date: deploy/manifests/old-example.yaml"]
