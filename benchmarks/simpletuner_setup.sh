#!/usr/bin/env bash
# Create a Python 3.12 venv with SimpleTuner 4.10.1 for bench_vs_simpletuner.py (see
# shared/peers/simpletuner-cpu.md). The venv lives outside the repo; SimpleTuner is never vendored.
#   benchmarks/simpletuner_setup.sh [/tmp/st-venv]
set -euo pipefail
VENV="${1:-/tmp/st-venv}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import simpletuner" 2>/dev/null; then
    echo "SimpleTuner venv ready: $VENV"; exit 0
fi
PY312="${PYTHON312:-}"
if [ -z "$PY312" ]; then
    for candidate in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then PY312="$candidate"; break; fi
    done
fi
[ -n "$PY312" ] || { echo "no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2; exit 1; }
case "$(realpath -m "$VENV")" in
    "$(realpath "$(dirname "$0")/..")"*) echo "refusing to create the venv inside the repo" >&2; exit 1;;
esac
"$PY312" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q simpletuner==4.10.1 torch==2.13.0 transformers==5.22.2
"$VENV/bin/python" -c "import simpletuner, torch, transformers; print('SimpleTuner venv ready:', torch.__version__, transformers.__version__)"
