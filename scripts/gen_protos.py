"""Regenerate the checked-in gRPC stubs from protos/ (needs grpcio-tools).

Stubs are checked in so that installing stagetune needs no protoc; tests/test_protos.py fails when
they are stale. Usage: python scripts/gen_protos.py [OUTPUT_ROOT]
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"


def generate(output_root: Path) -> list[Path]:
    from grpc_tools import protoc

    sources = sorted(PROTOS.glob("stagetune/v1/*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={output_root}",
        f"--pyi_out={output_root}",
        f"--grpc_python_out={output_root}",
        *[str(s.relative_to(PROTOS)) for s in sources],
    ]
    import os

    cwd = os.getcwd()
    os.chdir(PROTOS)
    try:
        code = protoc.main(args)
    finally:
        os.chdir(cwd)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    return sorted((output_root / "stagetune" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "services"
    for path in generate(out):
        print(path)
