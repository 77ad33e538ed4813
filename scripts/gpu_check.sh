#!/usr/bin/env bash
# The GPU tests (tests/gpu, `pytest -m gpu`) from a bare checkout, on a CUDA machine whose Python has torch,
# transformers, peft and pytest but no genloom installed (a stock CUDA image):
#   bash scripts/gpu_check.sh [more pytest arguments]
# Where genloom is installed (`make install` with a CUDA torch), `.venv/bin/pytest -m gpu` runs the same tests.
# What this adds to pytest: wheels in .whl/ (e.g. the protobuf/grpcio versions the generated stubs need) are
# installed to a private site dir put on PYTHONPATH; where `genloom` does not import, it is laid out as setup.py
# maps it (sdk/genloom's entries plus services/), without the SDK's __init__, which the engine does not need; only
# tests/gpu's conftest is loaded (tests/conftest.py needs the server dependencies). The log and the measured
# figures (gpu_report.json) go to $OUT (the device tool's folder) or /tmp/genloom-gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/genloom-gpu-check}
SITE=/tmp/genloom-gpu-check-site
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/wheels" \
    .whl/*.whl; then
    export PYTHONPATH="$SITE/wheels${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
if ! "$PY" -c "import genloom.services.inference.engine" 2>/dev/null; then
  rm -rf "$SITE/tree"
  mkdir -p "$SITE/tree/genloom"
  for entry in sdk/genloom/*; do
    case "$(basename "$entry")" in __init__.py | __pycache__) ;; *) ln -s "$PWD/$entry" "$SITE/tree/genloom/" ;; esac
  done
  ln -s "$PWD/services" "$SITE/tree/genloom/services"
  : >"$SITE/tree/genloom/__init__.py"
  export PYTHONPATH="$SITE/tree${PYTHONPATH:+:$PYTHONPATH}"
fi
export GENLOOM_GPU_REPORT="$OUT_DIR/gpu_report.json"
PYTHONUNBUFFERED=1 "$PY" -m pytest -m gpu -p no:cacheprovider --confcutdir tests/gpu -rs tests/gpu "$@" 2>&1 \
  | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
