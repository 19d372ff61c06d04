#!/usr/bin/env bash
# scripts/gpu_figures.sh: the one command that measures negstudy's GPU figures at the real size
# (issue 15, part 3): SD 2 base at 512 px and SDXL base 1.0 at 1024 px, real configurations with
# random weights, fp16, one process per model (scripts/bench.py --models sd2 / sdxl --device cuda).
#
# A session that holds the device machine (one H200; each command <= 10 min; ~15 min of device
# time in all, ~1-2 min of it start-up) runs, from the repository root, exactly:
#
#     device run:  command   = bash scripts/gpu_figures.sh
#                  carry     = [".whl"]
#                  timeout_s = 540
#
# The machine gets a copy of the working tree and nothing else; its python3 has torch, transformers,
# safetensors, huggingface_hub, tqdm, pandas and Pillow, but NOT diffusers (nor omegaconf / hydra,
# which the sd2 / sdxl path does not import), and no network. diffusers travels as wheels in the
# git-ignored .whl/ (the same as scripts/gpu_train.sh's). Make them here once, before the call:
#
#     .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl diffusers==0.42.1 importlib_metadata hydra-core==1.3.2 omegaconf==2.3.0
#     .venv/bin/python -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI
#
# (hydra-core, omegaconf and antlr4 serve the main job below, which composes the real overlay; the
# image has pandas, pyarrow and matplotlib.)
#
# What it does (expected 3-5 min; hard limits below: under 8 min in all): prints the versions and
# nvidia-smi first (so even a failed call says what is there), installs .whl into /tmp/site, then
# runs bench.py once per model under `timeout` (SD2_S, SDXL_S seconds) with --budget-s 60 s below
# it (parts not started by then are skipped, not killed); each run rewrites its JSON after every
# part, so a run cut short still brings back what it measured. Per model, in this order: sampler vs
# StableDiffusion(XL)Pipeline (30 steps, 1 image, median of 3), attention recording on/off (30 steps),
# the largest batch that fits (doubling to the first CUDA out-of-memory), throughput at that batch,
# the projections (strength-ratio study, whole removal benchmark, goal check: one GPU-hour), and the
# shared-prefix step sweep (SD2 at 30 steps, SDXL at 10). Then the main job (+sweep=critical_step,
# scripts/main_job_scale.py) on SD 2 base at 512 px and 30 steps, one pair-seed at the overlay's stride 5,
# read by CLIP: its time and peak GPU memory per pair-seed and the attention recorder's bytes at 64x64
# latents (MAIN_S seconds at most). Last, the merged tables.
# Everything comes back in $OUT (the only folder that does):
#     sd2.json, sdxl.json   each model's figures (bench.py's JSON)
#     main_job_sd2.json     the main job's figures on SD 2 base (main_job_scale.py's JSON)
#     gpu_figures.json      both, merged, with the projections
#     report.md             the Markdown tables and goal checks for the README's Performance section
#     sd2.log, sdxl.log, env.txt
#
# Back on the CPU machine (files land read-only under the tool's files_at folder):
#     .venv/bin/python scripts/bench.py --report <files_at>/sd2.json <files_at>/sdxl.json
#
# CPU dry run of the same command (64 px, 1-layer text encoders, ~1/10 of the channels; seconds; the
# main job at the real channels, 64 px, 1 step: a few minutes):
#     OUT=/tmp/gpu_figures_dry DEVICE=cpu EXTRA=--quick MAIN_ARGS="--steps 1 --size 64" MAIN_S=600 \
#         OMP_NUM_THREADS=1 PYTHON=.venv/bin/python bash scripts/gpu_figures.sh
#
# Overrides (environment): DEVICE (cuda), MODELS ("sd2 sdxl"), SD2_S (180), SDXL_S (240), MAIN_S (120),
# MAIN_ARGS (main_job_scale.py's size flags: "--steps 30 --stride 5"; the CPU dry run: "--steps 1 --size 64"),
# EXTRA (more bench.py flags, e.g. "--quick", "--options on", "--max-batch 128").

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_figures}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-sd2 sdxl}
SD2_S=${SD2_S:-180}
SDXL_S=${SDXL_S:-240}
MAIN_S=${MAIN_S:-120}
MAIN_ARGS=${MAIN_ARGS:---steps 30 --stride 5}
EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
# shellcheck source=scripts/device_lib.sh
source scripts/device_lib.sh
mkdir -p "$OUT"

{
echo "[${SECONDS}s] == environment ($(date -u +%FT%TZ))"
device_env diffusers transformers safetensors huggingface_hub tqdm pandas PIL accelerate
} 2>&1 | tee "$OUT/env.txt"

ensure_diffusers

rc=0
jsons=()
for model in $MODELS; do
    limit=$SD2_S
    [ "$model" = sdxl ] && limit=$SDXL_S
    echo "[${SECONDS}s] == $model: bench.py --device $DEVICE, at most $limit s"
    # shellcheck disable=SC2086
    timeout -k 10 "$limit" "$PY" scripts/bench.py --models "$model" --device "$DEVICE" --out "$OUT/$model.json" \
        --budget-s $((limit - 60)) $EXTRA 2>&1 | grep --line-buffered -v '^{' | tee "$OUT/$model.log"
    status=${PIPESTATUS[0]}
    echo "[${SECONDS}s] == $model: exit $status"
    [ "$status" = 0 ] || rc=$status
    [ -s "$OUT/$model.json" ] && jsons+=("$OUT/$model.json")
done

echo "[${SECONDS}s] == main job on SD 2 base: main_job_scale.py --device $DEVICE $MAIN_ARGS, at most $MAIN_S s"
# shellcheck disable=SC2086
timeout -k 10 "$MAIN_S" "$PY" scripts/main_job_scale.py --model sd2 --device "$DEVICE" $MAIN_ARGS \
    --out "$OUT/main_job_sd2.json" > "$OUT/main_job_sd2.log" 2>&1
status=$?
tail -n 40 "$OUT/main_job_sd2.log"
echo "[${SECONDS}s] == main job: exit $status"
[ "$status" = 0 ] || rc=$status

if [ ${#jsons[@]} -gt 0 ]; then
    echo "[${SECONDS}s] == merged tables (${jsons[*]})"
    "$PY" scripts/bench.py --report "${jsons[@]}" --out "$OUT/gpu_figures.json" | grep -v '^{' | tee "$OUT/report.md"
else
    echo "!! no model wrote figures" >&2
    rc=4
fi
echo "[${SECONDS}s] == done (exit $rc); \$OUT holds:"
ls -la "$OUT"
exit $rc
