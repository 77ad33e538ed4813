#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py) on a CUDA machine, from a bare checkout: no pip install of genloom.
#   bash scripts/gpu_check.sh [more gpu_check.py flags]
# Writes gpu_report.json to $OUT (the device tool's folder) or /tmp/genloom-gpu-check. Wheels in .whl/ (e.g.
# protobuf/grpcio versions the generated stubs need) go to a private site dir that only the stub-import probe uses.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/genloom-gpu-check}
mkdir -p "$OUT_DIR"
EXTRA=()
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=/tmp/genloom-gpu-check-site
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    EXTRA=(--extra-site "$SITE")
  fi
fi
PYTHONUNBUFFERED=1 "$PY" scripts/gpu_check.py --device cuda --dtype bfloat16 --out "$OUT_DIR" "${EXTRA[@]}" "$@" 2>&1 \
  | grep -v -e 'FutureWarning' -e 'warnings.warn(' -e 'return forward_call(' | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
