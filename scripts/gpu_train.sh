#!/usr/bin/env bash
# scripts/gpu_train.sh: the one command that trains the next shapes model on a rented GPU.
#
# A session that holds the device machine (one H200; each command <= 10 min; ~15 min of device
# time in all, ~1-2 min of it start-up) runs, from the repository root, exactly:
#
#     device run:  command   = bash scripts/gpu_train.sh
#                  carry     = [".whl"]
#                  timeout_s = 600
#
# The machine gets a copy of the working tree and nothing else; it has python3 with torch,
# transformers, safetensors, huggingface_hub, tqdm, pandas and Pillow, but NOT diffusers, and
# no network. So diffusers travels as wheels in the git-ignored .whl/ (6.4 MB; the .venv is
# far over the 64 MiB carry limit). Make them here once, before the call:
#
#     .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl diffusers==0.42.1 importlib_metadata
#
# What it does (about 9 minutes): prints the versions and nvidia-smi first (so even a failed call
# says what is there), installs .whl into /tmp/site, times the torch renderer alone (~40 s for
# these steps), then trains scripts/train_shapes.py for MINUTES (default 7.5) of loop time under
# `timeout -s INT LIMIT_S`, so an overrun still ends in a clean save and the whole command ends
# well inside the 600 s a command may run (7.5 min + start-up + final save + contact sheet). Checkpoints stay on the machine (RUN_DIR); every save
# (each SAVE_EVERY minutes, and the end) refreshes the compact package in $OUT, the only folder
# that comes back: unet.safetensors (~13 MB fp16 EMA), text_encoder.safetensors (~6.6 MB),
# training_log.csv, meta.json (model configs, command, hardware, images seen, time, steps/s,
# the sample captions) and samples.png (a contact sheet of 64 samples, 30 PNDM steps, CFG 7.5).
#
# Back on the CPU machine (files land read-only under the tool's files_at folder):
#     .venv/bin/python scripts/train_shapes.py --assemble <files_at> --out runs/shapes-next/model
#     .venv/bin/python scripts/measure_shapes.py --model runs/shapes-next/model ...
#
# CPU dry run of the same command (what negstudy/models/shapes/README.md reports):
#     OUT=/tmp/gpu_train_dry DEVICE=cpu BATCH=64 MINUTES=2 SAMPLE=4 OMP_NUM_THREADS=2 \
#         PYTHON=.venv/bin/python bash scripts/gpu_train.sh
#
# The design is the CPU-trained shipped model's (negstudy/models/shapes/README.md: UNet 32-64-128 with one
# layer per block, text encoder 2 x 128, Min-SNR-5, offset noise 0.2, the oracle probe every PROBE_EVERY
# minutes), at a larger batch: lr 1e-3 at batch 32 scaled by sqrt(batch / 32) (4e-3 at 512; unmeasured on a GPU).
#
# Overrides (environment): DEVICE (cuda), BATCH (512), PROBE_EVERY (2), MINUTES (7.5), SAVE_EVERY (2), SAMPLE (64),
# RUN_DIR (/tmp/shapes_next_run), LIMIT_S (510: hard stop of the training process), EXTRA (more
# train_shapes.py flags, e.g. "--compile": unmeasured, its compile time counts against MINUTES).

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_train}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-512}
MINUTES=${MINUTES:-7.5}
SAVE_EVERY=${SAVE_EVERY:-2}
RUN_DIR=${RUN_DIR:-/tmp/shapes_next_run}
LIMIT_S=${LIMIT_S:-510}
SAMPLE=${SAMPLE:-64}
PROBE_EVERY=${PROBE_EVERY:-2}
EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
# shellcheck source=scripts/device_lib.sh
source scripts/device_lib.sh
mkdir -p "$OUT"

echo "[${SECONDS}s] == environment ($(date -u +%FT%TZ))"
device_env diffusers transformers safetensors huggingface_hub tqdm pandas PIL

ensure_diffusers

echo "[${SECONDS}s] == renderer alone (negstudy.shapes.render_torch: sample + render + tokenise)"
timeout 90 "$PY" - "$DEVICE" <<'EOF' || echo "!! renderer timing failed (training still runs)"
import sys, time, torch
from negstudy.shapes.render_torch import CaptionTokens, make_batch
from negstudy.shapes.world import VOCABULARY
from negstudy.tokenizer import build_clip_tokenizer
dev = torch.device(sys.argv[1])
tokens = CaptionTokens(build_clip_tokenizer(list(VOCABULARY)))
g = torch.Generator(device=dev).manual_seed(0)
n, reps = (50_000, 10) if dev.type == "cuda" else (4096, 3)
make_batch(n, g, tokens)  # warm-up
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
sync(); t = time.perf_counter()
for _ in range(reps):
    make_batch(n, g, tokens)
sync(); dt = time.perf_counter() - t
print(f"renderer: {n * reps / dt:,.0f} images/s ({n}-image chunks, {reps} reps, {dev}, {torch.get_num_threads()} threads)")
EOF

echo "[${SECONDS}s] == training: batch $BATCH, $MINUTES min, device $DEVICE, run dir $RUN_DIR, package $OUT"
rm -rf "$RUN_DIR"
# shellcheck disable=SC2086
timeout -s INT -k 30 "$LIMIT_S" "$PY" scripts/train_shapes.py --out "$RUN_DIR" --package "$OUT" --device "$DEVICE" \
    --data torch --minutes "$MINUTES" --save-every-minutes "$SAVE_EVERY" --batch-size "$BATCH" \
    --lr 1e-3 --lr-base-batch 32 --lr-scaling sqrt --warmup-steps 250 --offset-noise 0.2 --min-snr 5 \
    --unet-channels 32,64,128 --unet-layers 1 --text-width 128 --text-layers 2 \
    --probe-every-minutes "$PROBE_EVERY" --probe-n 128 --sample "$SAMPLE" --progress lines --log-every 100 $EXTRA
rc=$?
echo "[${SECONDS}s] == train_shapes.py exit $rc; \$OUT holds:"
ls -la "$OUT"
"$PY" -c 'import json, sys; r = json.load(open(sys.argv[1]))["run"]; print({k: r[k] for k in ("images_seen", "train_seconds", "steps_per_s", "images_per_s", "hardware")})' "$OUT/meta.json" 2>/dev/null
exit $rc
