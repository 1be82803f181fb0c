"""optimum-quanto's int4/int2 kernels built ahead of time (as the images do) and handed to quanto at run time.

Built and used for real here: the CPU extension (g++ is on this machine). The CUDA and HIP builds need nvcc or
hipcc and a GPU torch, which this machine lacks: for them the tests check which build a device picks and the
flags a build would use, and the Dockerfiles' kernel stages (test_images.py lints them).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from stagetune.core.errors import PreconditionError
from stagetune.models import quantise, quanto_kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CPU extension built as the image build step builds it (a real compile, about 20 s)."""
    root = tmp_path_factory.mktemp("quanto-kernels")
    result = subprocess.run([sys.executable, "-m", "stagetune.models.quanto_kernels", "build", str(root)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_the_build_leaves_the_library_and_its_torch_version_only(kernels: Path) -> None:
    import torch

    (folder,) = kernels.iterdir()
    assert folder.name == "quanto_cpp"
    assert sorted(p.name for p in folder.iterdir()) == ["pytorch_version.txt", "quanto_cpp.so"]
    assert (folder / "pytorch_version.txt").read_text() == torch.__version__
    assert not list(kernels.glob("*.partial"))


def test_int4_runs_on_the_prebuilt_kernels_without_compiling(kernels: Path) -> None:
    """In a fresh process quanto's own compile step is made to fail: int4 weights still unpack, through the
    prebuilt library, and dequantise to the weights they came from."""
    script = textwrap.dedent(f"""
        import torch
        from optimum.quanto.library.extensions import extension

        def no_compiling(**kwargs):
            raise AssertionError("quanto compiled " + kwargs["name"] + " at run time")

        extension.load = no_compiling
        from stagetune.models import quanto_kernels

        found = quanto_kernels.use_prebuilt()
        assert found["quanto_cpp"].usable, found
        lib = extension.get_extension("quanto_cpp").lib
        assert lib.__file__.startswith({str(kernels)!r}), lib.__file__
        calls = []
        unpack = lib.unpack
        lib.unpack = lambda t, bits: calls.append(bits) or unpack(t, bits)

        from optimum import quanto

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 64)).to(torch.bfloat16)
        weight = model[0].weight.detach().float().clone()
        quanto.quantize(model, weights=quanto.qint4)
        quanto.freeze(model)
        linear = model[0]
        restored = linear.qweight.dequantize().float()
        assert calls and set(calls) == {{4}}, calls
        error = (restored - weight).abs().max().item()
        scale = weight.abs().max().item()
        assert error < scale / 7, (error, scale)  # within one int4 step of the largest weight
        assert linear(torch.randn(2, 128, dtype=torch.bfloat16)).shape == (2, 64)
        print("ok", len(calls), error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**_env(), quanto_kernels.ENV_DIR: str(kernels)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok ")


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _fake_extension(name: str, arch: str | None = None) -> SimpleNamespace:
    flags = ["--expt-extended-lambda", "--use_fast_math"] + ([f"-DQUANTO_CUDA_ARCH={arch}"] if arch else [])
    return SimpleNamespace(name=name, extra_cuda_cflags=flags if name != "quanto_cpp" else None, _lib=None,
                           build_directory="/nonexistent/quanto/build")


def _fake_build(root: Path, folder: str, name: str, torch_version: str | None = None) -> None:
    import torch

    (root / folder).mkdir(parents=True)
    (root / folder / f"{name}.so").write_bytes(b"\x7fELF")
    (root / folder / "pytorch_version.txt").write_text(torch_version or torch.__version__)


def test_a_gpu_gets_the_build_for_the_arch_quanto_computed_for_it(tmp_path: Path) -> None:
    """quanto's CUDA flags carry the device's arch (QUANTO_CUDA_ARCH): an H100 (900) gets sm900's build, a
    B200 (1000) sm1000's, and a GPU without a build is told what there is."""
    _fake_build(tmp_path, "quanto_cuda-sm900", "quanto_cuda")
    _fake_build(tmp_path, "quanto_cuda-sm1000", "quanto_cuda", torch_version="2.9.0")
    hopper = quanto_kernels.locate(_fake_extension("quanto_cuda", "900"), tmp_path)
    assert hopper.usable and hopper.folder == tmp_path / "quanto_cuda-sm900"
    stale = quanto_kernels.locate(_fake_extension("quanto_cuda", "1000"), tmp_path)
    assert not stale.usable and "was built for torch 2.9.0" in stale.why
    missing = quanto_kernels.locate(_fake_extension("quanto_cuda", "1200"), tmp_path)
    assert not missing.usable
    assert "quanto_cuda-sm1200/quanto_cuda.so" in missing.why and "quanto_cuda-sm1000, quanto_cuda-sm900" in missing.why


def test_build_flags_are_those_a_device_of_that_capability_would_make() -> None:
    ext = _fake_extension("quanto_cuda", "000")  # what quanto computes on a machine without a GPU
    assert quanto_kernels.cuda_flags(ext, "10.0") == ["--expt-extended-lambda", "--use_fast_math",
                                                      "-DQUANTO_CUDA_ARCH=1000"]
    assert [quanto_kernels.cuda_arch_define(c) for c in ("9.0", "10.0", "12.0", "8.6")] == ["900", "1000", "1200",
                                                                                           "860"]
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        quanto_kernels.cuda_arch_define("sm_90")


def test_int4_is_refused_where_quanto_could_neither_use_nor_build_its_kernels(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = _fake_extension("quanto_cpp")
    monkeypatch.setattr(quanto_kernels, "_quanto_extensions", lambda: {"quanto_cpp": cpu})
    monkeypatch.delenv(quanto_kernels.ENV_DIR, raising=False)
    assert quanto_kernels.compile_problem() is None  # this machine has g++ and may write

    monkeypatch.setattr(quanto_kernels, "_writable", lambda folder: False)  # a read-only site-packages
    problem = quanto_kernels.compile_problem(tmp_path)
    assert problem is not None and "build folder /nonexistent/quanto/build is not writable" in problem
    assert f"no {tmp_path}/quanto_cpp/quanto_cpp.so" in problem
    with pytest.raises(PreconditionError, match="base_model_precision=int4-quanto needs optimum-quanto's compiled "
                                                "kernels: quanto_cpp is not prebuilt") as info:
        monkeypatch.setenv(quanto_kernels.ENV_DIR, str(tmp_path))
        quantise._kernels_for("int4-quanto", "base_model_precision")
    assert info.value.field == "base_model_precision"
    quantise._kernels_for("int8-quanto", "base_model_precision")  # int8 (and fp8 off CUDA) needs no kernels

    _fake_build(tmp_path, "quanto_cpp", "quanto_cpp")
    assert quanto_kernels.compile_problem(tmp_path) is None  # prebuilt: nothing to compile


def test_prebuilt_kernels_let_a_machine_without_a_compiler_take_int4(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantise.shutil, "which", lambda name: None)
    monkeypatch.delenv(quanto_kernels.ENV_DIR, raising=False)
    with pytest.raises(PreconditionError, match="no C\\+\\+ compiler"):
        quantise.check_precision("int2-quanto", "base_model_precision")
    _fake_build(tmp_path, "quanto_cpp", "quanto_cpp")
    monkeypatch.setenv(quanto_kernels.ENV_DIR, str(tmp_path))
    quantise.check_precision("int2-quanto", "base_model_precision")  # the image's case: no compiler, kernels built


def test_check_says_what_this_machine_would_use(kernels: Path, tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "stagetune.models.quanto_kernels", "check", str(kernels)],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and f"quanto_cpp: prebuilt in {kernels}/quanto_cpp" in ok.stdout
    empty = subprocess.run([sys.executable, "-m", "stagetune.models.quanto_kernels", "check", str(tmp_path)],
                           capture_output=True, text=True, timeout=300)
    assert empty.returncode == 1 and f"quanto_cpp: no {tmp_path}/quanto_cpp/quanto_cpp.so" in empty.stdout


def test_a_build_that_cannot_be_made_is_refused_before_compiling(tmp_path: Path) -> None:
    import torch

    def build(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stagetune.models.quanto_kernels", "build", str(tmp_path / "k"),
                               *args], capture_output=True, text=True, timeout=300)

    bad = build("--cuda-arch", "sm_90")
    assert bad.returncode == 2 and "compute capability is MAJOR.MINOR such as 9.0 or 10.0, not 'sm_90'" in bad.stderr
    if not torch.version.cuda:
        cpu = build("--cuda-arch", "9.0")
        assert cpu.returncode == 1 and "CUDA kernels need a CUDA build of torch" in cpu.stderr
    if not torch.version.hip:
        no_rocm = build("--hip")
        assert no_rocm.returncode == 1 and "HIP kernels need a ROCm build of torch" in no_rocm.stderr
    assert not (tmp_path / "k").exists()  # nothing was compiled first


def test_builds_of_one_extension_in_one_process_each_keep_its_name(tmp_path: Path) -> None:
    """The image builds quanto_cuda once per capability in one process: torch would name the second build
    `<name>_v1`, which quanto could not import as `<name>`. A two-line extension stands in for quanto's."""
    source = tmp_path / "tiny.cpp"
    source.write_text('#include <Python.h>\n'
                      'static struct PyModuleDef tiny = {PyModuleDef_HEAD_INIT, "tiny_ext", nullptr, -1, nullptr};\n'
                      'PyMODINIT_FUNC PyInit_tiny_ext(void) { return PyModule_Create(&tiny); }\n')
    first = quanto_kernels._build_one("tiny_ext", [str(source)], tmp_path / "k" / "tiny_ext-sm900", cflags=["-O0"],
                                      cuda_cflags=None, verbose=False)
    second = quanto_kernels._build_one("tiny_ext", [str(source)], tmp_path / "k" / "tiny_ext-sm1000",
                                       cflags=["-O1"], cuda_cflags=None, verbose=False)
    assert first == tmp_path / "k" / "tiny_ext-sm900" / "tiny_ext.so" and first.is_file()
    assert second == tmp_path / "k" / "tiny_ext-sm1000" / "tiny_ext.so" and second.is_file()
    assert quanto_kernels._import_library("tiny_ext", second.parent).__name__ == "tiny_ext"


def test_a_newer_minor_of_the_same_major_runs_the_older_build(tmp_path: Path) -> None:
    """A GB300 (10.3) runs the 10.0 build, a Hopper never runs a Blackwell one, and an exact build wins."""
    _fake_build(tmp_path, "quanto_cuda-sm1000", "quanto_cuda")
    _fake_build(tmp_path, "quanto_cuda-sm1200", "quanto_cuda")
    assert quanto_kernels.locate(_fake_extension("quanto_cuda", "1030"), tmp_path).folder.name == "quanto_cuda-sm1000"
    assert quanto_kernels.locate(_fake_extension("quanto_cuda", "1200"), tmp_path).folder.name == "quanto_cuda-sm1200"
    hopper = quanto_kernels.locate(_fake_extension("quanto_cuda", "900"), tmp_path)
    assert not hopper.usable and "quanto_cuda-sm900/quanto_cuda.so" in hopper.why


def test_verify_loads_each_build_and_names_one_that_cannot(kernels: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil as sh

    ok = subprocess.run([sys.executable, "-m", "stagetune.models.quanto_kernels", "verify", str(kernels)],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and f"{kernels}/quanto_cpp/quanto_cpp.so: loads" in ok.stdout
    broken = tmp_path / "broken"
    sh.copytree(kernels, broken)
    (broken / "quanto_cpp" / "quanto_cpp.so").write_bytes(b"\x7fELF not really")
    bad = subprocess.run([sys.executable, "-m", "stagetune.models.quanto_kernels", "verify", str(broken)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and f"{broken}/quanto_cpp/quanto_cpp.so: FAILS" in bad.stdout
    # At run time the same library is not used, and says why, instead of a traceback.
    cpu = _fake_extension("quanto_cpp")
    monkeypatch.setattr(quanto_kernels, "_quanto_extensions", lambda: {"quanto_cpp": cpu})
    found = quanto_kernels.use_prebuilt(broken)
    assert not found["quanto_cpp"].usable and "cannot be loaded" in found["quanto_cpp"].why and cpu._lib is None
