# shellcheck shell=bash
# Shared by the one-call device scripts (scripts/gpu_train.sh, scripts/gpu_figures.sh); source it after
# setting PY. device_env prints what the machine has (versions of the modules named as arguments,
# GPU, CPU), so even a failed call says what was there; ensure_diffusers installs the wheels carried
# in .whl/ (the device image has no diffusers and no network) and exits 3 if they are still missing.

device_env() {
    "$PY" - "$@" <<'PYEOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))
for m in sys.argv[1:]:
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as err:  # noqa: BLE001
        print(m, "MISSING", type(err).__name__, err)
PYEOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"
}

ensure_diffusers() {
    if ! "$PY" -c 'import diffusers' 2>/dev/null; then
        if ls .whl/*.whl >/dev/null 2>&1; then
            echo "[${SECONDS}s] == installing $(ls .whl | tr '\n' ' ')into /tmp/site"
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
            export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        fi
    fi
    if ! "$PY" -c 'import diffusers, transformers' ; then
        echo "!! FATAL: diffusers/transformers not importable. Carry .whl (see this script's header) and rerun." >&2
        exit 3
    fi
}
