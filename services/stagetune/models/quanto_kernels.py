"""optimum-quanto's compiled kernels, built when the image is built instead of at first use.

quanto compiles its C++ (CPU), CUDA or HIP extension the first time an int4/int2 weight is unpacked (or, on a CUDA
GPU, an fp8 weight meets its Marlin matmul), into a folder inside its own site-packages. In our images that cannot
work: site-packages is read-only and owned by root, the final stage has no compiler, and the CUDA build depends on
the GPU present (quanto defines `QUANTO_CUDA_ARCH` as the highest compute capability of the visible devices,
clamped to torch's arch list, and compiles only the kernels that arch can run). So the image builds each extension
ahead of time, once per GPU architecture it serves, into `STAGETUNE_QUANTO_KERNELS` (`python -m
stagetune.models.quanto_kernels build`), and `use_prebuilt()` hands quanto the build this machine would have made,
so it never compiles.

Layout: `<root>/<extension>[-sm<arch>]/<extension>.so` and `pytorch_version.txt`, as quanto's own build folder
has them; a build for another torch release is ignored (quanto would rebuild it too).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ENV_DIR = "STAGETUNE_QUANTO_KERNELS"
_ARCH_DEFINE = re.compile(r"^-DQUANTO_CUDA_ARCH=(\d+)$")
_VERSION_FILE = "pytorch_version.txt"


@dataclasses.dataclass(frozen=True)
class Prebuilt:
    """Where this machine's build of one quanto extension is (or would be), and whether it can be used."""

    name: str
    folder: Path
    usable: bool
    why: str  # when not usable: what is missing, in words


def cuda_arch_define(capability: str) -> str:
    """quanto's `QUANTO_CUDA_ARCH` for a compute capability such as "9.0" or "12.0" (900, 1200)."""
    major, _, minor = capability.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise ValueError(f"a CUDA compute capability is MAJOR.MINOR such as 9.0 or 10.0, not {capability!r}")
    return f"{int(major)}{int(minor)}0"


def folder_name(extension: str, arch_define: str | None) -> str:
    return f"{extension}-sm{arch_define}" if arch_define else extension


def _arch_of(flags: Sequence[str] | None) -> str | None:
    for flag in flags or ():
        found = _ARCH_DEFINE.match(flag)
        if found:
            return found[1]
    return None


def _quanto_extensions() -> dict[str, Any]:
    """quanto's extensions for this machine's devices (CPU always; CUDA or HIP where a GPU is visible)."""
    import optimum.quanto.library.extensions  # noqa: F401  (registers them)
    from optimum.quanto.library.extensions import extension

    return extension._extensions


def kernels_root(env: dict[str, str] | None = None) -> Path | None:
    value = (os.environ if env is None else env).get(ENV_DIR, "").strip()
    return Path(value) if value else None


def built_libraries(root: Path, extension: str = "quanto_") -> list[Path]:
    """The finished builds under `root` (of one extension, or all); a `.partial` folder is an unfinished one."""
    return sorted(p for p in root.glob(f"{extension}*/*.so") if not p.parent.name.endswith(".partial"))


def _built_for(folder: Path) -> str:
    """The torch a build was made for, in words (from quanto's own version file)."""
    version_file = folder / _VERSION_FILE
    return f"torch {version_file.read_text().strip()}" if version_file.is_file() else "an unknown torch"


def _compatible_arches(define: str) -> list[str]:
    """The builds a GPU can run, best first: its own arch, then lower minors of its major (a cubin for X.y runs
    on X.z for z >= y, and quanto's arch only selects kernels by thresholds such as >= 800)."""
    value = int(define)
    major, minor = value // 100, (value // 10) % 10
    return [define, *(f"{major}{m}0" for m in range(minor - 1, -1, -1))]


def locate(ext: Any, root: Path) -> Prebuilt:
    import torch
    import torch.utils.cpp_extension

    arch = _arch_of(ext.extra_cuda_cflags)
    candidates = [root / folder_name(ext.name, a) for a in (_compatible_arches(arch) if arch else [None])]
    library_name = f"{ext.name}{torch.utils.cpp_extension.LIB_EXT}"
    folder = next((f for f in candidates if (f / library_name).is_file()), None)
    if folder is None:
        built = [p.parent.name for p in built_libraries(root, ext.name)]
        return Prebuilt(ext.name, candidates[0], False, f"no {candidates[0] / library_name}"
                        + (f" (built here: {', '.join(built)})" if built else ""))
    built_for = _built_for(folder)
    if built_for != f"torch {torch.__version__}":
        return Prebuilt(ext.name, folder, False, f"{folder / library_name} was built for {built_for}, this "
                                                 f"is {torch.__version__}")
    return Prebuilt(ext.name, folder, True, "")


def _import_library(name: str, folder: Path) -> Any:
    """Import a built extension as torch's JIT loader would (a Python module from `<folder>/<name>.so`)."""
    import torch  # noqa: F401  (its libraries must be loaded first)
    import torch.utils.cpp_extension

    spec = importlib.util.spec_from_file_location(name, folder / f"{name}{torch.utils.cpp_extension.LIB_EXT}")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def use_prebuilt(root: Path | None = None) -> dict[str, Prebuilt]:
    """Hand quanto every extension built for this machine under `root` (default: `STAGETUNE_QUANTO_KERNELS`).
    Returns what was looked for, by extension; an extension quanto already loaded is left as it is."""
    root = root if root is not None else kernels_root()
    if root is None:
        return {}
    found: dict[str, Prebuilt] = {}
    for ext in _quanto_extensions().values():
        prebuilt = locate(ext, root)
        if prebuilt.usable and ext._lib is None:
            try:
                ext._lib = _import_library(ext.name, prebuilt.folder)
            except (ImportError, OSError) as exc:  # e.g. built against another C++ runtime than this image's
                prebuilt = dataclasses.replace(prebuilt, usable=False, why=f"{prebuilt.folder} cannot be loaded: {exc}")
        found[ext.name] = prebuilt
    return found


def compile_problem(root: Path | None = None) -> str | None:
    """Why int4/int2 cannot run here, or None: every quanto extension this machine needs is either prebuilt
    for it, or can be compiled now (a C++ compiler, and quanto's build folder writable)."""
    root = root if root is not None else kernels_root()
    problems = []
    for ext in _quanto_extensions().values():
        prebuilt = locate(ext, root) if root is not None else None
        if ext._lib is not None or (prebuilt is not None and prebuilt.usable):
            continue
        where = Path(ext.build_directory)
        if not (shutil.which("c++") or shutil.which("g++")):
            problem = f"{ext.name} is not prebuilt for this machine and no C++ compiler (g++) is installed"
        elif not _writable(where):
            problem = f"{ext.name} is not prebuilt for this machine and quanto's build folder {where} is not writable"
        else:
            continue
        problems.append(problem + (f" ({prebuilt.why})" if prebuilt is not None else ""))
    return "; ".join(problems) or None


def _writable(folder: Path) -> bool:
    """Whether quanto could make and write its build folder (the nearest existing parent decides)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    return os.access(existing, os.W_OK)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cuda_flags(ext: Any, capability: str) -> list[str]:
    """quanto's CUDA flags as a device of `capability` would make them."""
    flags = [f for f in (ext.extra_cuda_cflags or []) if not _ARCH_DEFINE.match(f)]
    return [*flags, f"-DQUANTO_CUDA_ARCH={cuda_arch_define(capability)}"]


def _build_one(name: str, sources: list[str], folder: Path, *, cflags: list[str] | None,
               cuda_cflags: list[str] | None, verbose: bool) -> Path:
    import torch
    import torch.utils.cpp_extension

    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # torch numbers a second build of one name in a process (quanto_cuda_v1, _v2, with that module name inside)
    # when its flags or folder differ; each of ours is a build of its own, under quanto's name.
    versioner = getattr(torch.utils.cpp_extension, "JIT_EXTENSION_VERSIONER", None)
    if versioner is not None:
        versioner.entries.pop(name, None)
    torch.utils.cpp_extension.load(name=name, sources=sources, extra_cflags=cflags, extra_cuda_cflags=cuda_cflags,
                                   build_directory=str(staging), verbose=verbose)
    library = f"{name}{torch.utils.cpp_extension.LIB_EXT}"
    if not (staging / library).is_file():
        raise RuntimeError(f"building {name} left no {library} in {staging} (found: "
                           f"{', '.join(sorted(p.name for p in staging.iterdir()))})")
    for leftover in staging.iterdir():  # object files and ninja's state: the image needs the library only
        if leftover.name != library:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    (staging / _VERSION_FILE).write_text(torch.__version__)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)  # whole or absent: an interrupted build leaves only a .partial folder
    return folder / library


def build(root: Path, *, cuda_capabilities: Sequence[str] = (), hip: bool = False,
          verbose: bool = False) -> list[Path]:
    """Build quanto's CPU extension, plus the CUDA one per capability (needs nvcc and a CUDA torch; no GPU) or
    the HIP one (needs hipcc and a ROCm torch; PYTORCH_ROCM_ARCH picks the GPUs). Returns the libraries.
    What cannot be built is said before anything is compiled."""
    import torch

    defines = [cuda_arch_define(capability) for capability in cuda_capabilities]
    if cuda_capabilities and not torch.version.cuda:
        raise SystemExit(f"CUDA kernels need a CUDA build of torch; this one is {torch.__version__}")
    if hip and not torch.version.hip:
        raise SystemExit(f"HIP kernels need a ROCm build of torch; this one is {torch.__version__}")
    # What this torch was compiled for, known without a GPU (the list comes from the build, not the devices).
    supported = {a.removeprefix("sm_") for a in torch.cuda.get_arch_list() if a.startswith("sm_")}
    for capability, define in zip(cuda_capabilities, defines, strict=True):
        if supported and define[:-1] not in supported:
            raise SystemExit(f"torch {torch.__version__} has no kernels for compute capability {capability} "
                             f"(it has sm_{', sm_'.join(sorted(supported, key=int))})")
    from optimum.quanto.library.extensions import cpp

    root.mkdir(parents=True, exist_ok=True)
    built = [_build_one(cpp.ext.name, cpp.ext.sources, root / folder_name(cpp.ext.name, None),
                        cflags=cpp.ext.extra_cflags, cuda_cflags=None, verbose=verbose)]
    if cuda_capabilities:
        # Imported directly: quanto registers it only where a GPU is visible, and image builds have none.
        from optimum.quanto.library.extensions import cuda

        for capability, define in zip(cuda_capabilities, defines, strict=True):
            with _environ(TORCH_CUDA_ARCH_LIST=capability):
                built.append(_build_one(cuda.ext.name, cuda.ext.sources, root / folder_name(cuda.ext.name, define),
                                        cflags=cuda.ext.extra_cflags, cuda_cflags=cuda_flags(cuda.ext, capability),
                                        verbose=verbose))
    if hip:
        from optimum.quanto.library.extensions import hip as hip_ext

        built.append(_build_one(hip_ext.ext.name, hip_ext.ext.sources, root / folder_name(hip_ext.ext.name, None),
                                cflags=hip_ext.ext.extra_cflags, cuda_cflags=hip_ext.ext.extra_cuda_cflags,
                                verbose=verbose))
    return built


def _verify(root: Path) -> int:
    """Import each built library in a fresh process (two builds of one extension share a module name), so an
    image whose kernels cannot load here (another C++ runtime, a missing CUDA library) fails to build."""
    import subprocess

    import torch

    libraries = built_libraries(root)
    if not libraries:
        print(f"no built kernels under {root}", file=sys.stderr)
        return 1
    failed = 0
    for library in libraries:
        version = _built_for(library.parent)
        script = ("import sys; from pathlib import Path; from stagetune.models.quanto_kernels import _import_library; "
                  "_import_library(sys.argv[1], Path(sys.argv[2]))")
        result = subprocess.run([sys.executable, "-c", script, library.stem, str(library.parent)],
                                capture_output=True, text=True)
        current = version == f"torch {torch.__version__}"
        ok = result.returncode == 0 and current
        failed += not ok
        why = "" if ok else (f": built for {version}, this is {torch.__version__}" if not current
                             else ": " + (result.stderr.strip().splitlines() or ["import failed"])[-1])
        print(f"{library}: {'loads' if ok else 'FAILS'}{why}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagetune.models.quanto_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("build", help="build quanto's extensions into a folder (an image build step)")
    make.add_argument("root", type=Path)
    make.add_argument("--cuda-arch", nargs="*", default=[], metavar="MAJOR.MINOR",
                      help="compute capabilities to build the CUDA kernels for, e.g. 9.0 10.0 12.0")
    make.add_argument("--hip", action="store_true", help="build the HIP kernels (ROCm torch; PYTORCH_ROCM_ARCH)")
    make.add_argument("--verbose", action="store_true")
    verify = sub.add_parser("verify", help="load every library under a folder, each in its own process (an image "
                                           "build's last check: no GPU needed)")
    verify.add_argument("root", type=Path)
    check = sub.add_parser("check", help="say which prebuilt extensions this machine would use")
    check.add_argument("root", type=Path, nargs="?")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            libraries = build(args.root, cuda_capabilities=args.cuda_arch, hip=args.hip, verbose=args.verbose)
        except ValueError as exc:
            parser.error(str(exc))
        print("\n".join(str(library) for library in libraries))
        return 0
    if args.command == "verify":
        return _verify(args.root)
    root = args.root or kernels_root()
    if root is None:
        print(f"no folder given and {ENV_DIR} is not set", file=sys.stderr)
        return 2
    found = {ext.name: locate(ext, root) for ext in _quanto_extensions().values()}
    for prebuilt in found.values():
        print(f"{prebuilt.name}: " + (f"prebuilt in {prebuilt.folder}" if prebuilt.usable else prebuilt.why))
    return 0 if all(p.usable for p in found.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
