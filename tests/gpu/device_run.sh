#!/usr/bin/env bash
# The GPU check of one lent machine, in one bounded run (issue 13; see tests/gpu/README.md).
#
#   bash tests/gpu/device_run.sh [OUT_DIR]      # OUT_DIR: $OUT if set, else out/gpu
#
# Expects the machine's python3 to hold a CUDA torch, CuPy, pyarrow and pytest, and the
# dora-rs and dora-rs-cli wheels (cp312) carried in .whl/ when dora is not installed. Runs,
# each under its own time limit: the 30-second two-process smoke check (smoke.py), then
# `pytest tests/gpu -x` (JUnit XML), then a short benchmark (bench_ipc.py). Writes
# gpu.csv, env.json, smoke.json, junit.xml, pytest.log, bench.json under OUT_DIR and exits
# non-zero when any step failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${1:-${OUT:-out/gpu}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=$PWD/libs/arrow_tensor/src${PYTHONPATH:+:$PYTHONPATH}
# dora starts Python nodes with the `python` on PATH: make it this interpreter.
mkdir -p /tmp/gpu-shim && ln -sf "$(command -v python3)" /tmp/gpu-shim/python
export PATH=/tmp/gpu-shim:$PATH

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT_DIR/gpu.csv" 2>&1
python3 - > "$OUT_DIR/env.json" <<'PY'
import json, platform, torch
out = {"python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)}
try:
    import cupy
    out["cupy"] = cupy.__version__
except ImportError:
    out["cupy"] = None
try:
    import dora
    out["dora"] = getattr(dora, "__version__", "installed")
except ImportError:
    out["dora"] = None
print(json.dumps(out, indent=2))
PY
cat "$OUT_DIR/env.json"

# What the tests import, said before anything runs (a missing one would fail collection).
python3 -c "import dora, hypothesis, pytest_timeout, xxhash, yaml, pyarrow, torch" || {
    echo "device_run: a package is missing (carry its wheel in .whl/)"; exit 4; }
command -v dora > /dev/null || { echo "device_run: no dora CLI on PATH"; exit 4; }

# Limits add up to 510 s, inside one 600-second call with the set-up.
timeout 80 python3 tests/gpu/smoke.py --seconds 30 --json "$OUT_DIR/smoke.json"
smoke=$?
timeout 330 python3 -m pytest tests/gpu -x -q -p no:cacheprovider \
    --timeout=240 --junitxml="$OUT_DIR/junit.xml" 2>&1 | tee "$OUT_DIR/pytest.log"
tests=${PIPESTATUS[0]}
timeout 100 python3 tests/gpu/bench_ipc.py --rounds 3 --json "$OUT_DIR/bench.json"
bench=$?
echo "device_run: smoke=$smoke tests=$tests bench=$bench"
[ "$smoke" -eq 0 ] && [ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
