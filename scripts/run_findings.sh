#!/usr/bin/env bash
# Every sweep of the findings on the shipped model, one after another (one torch job at a time),
# each timed with /usr/bin/time; then the findings from their tables:
#   bash scripts/run_findings.sh [outputs/findings]     (~1 hour on a 2-core CPU)
# A sweep already finished is skipped by negstudy's job store; a killed one resumes.
#
# PROFILE=decide runs the studies of the claims still "inconclusive at this n" at the n their
# "n to decide" column asks for (docs/findings.md), each as the same two-shard multirun (a cluster
# raises dataset.shards): reverse activation on 6 pairs x 32 seeds where the negative's object is
# absent (192 pair-seeds; ~32 min here), removal on all 12 captions of shapes_removal x 36 seeds
# (the preference rows need ~12-13 captions; ~18 min here). The fixed window's rate sits 2 points
# from its band's edge (~600 captions): no profile here decides it.
#   PROFILE=decide SWEEPS="reverse_activation removal" bash scripts/run_findings.sh outputs/decide
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/findings}
mkdir -p "$out"
grep -m1 "model name" /proc/cpuinfo > "$out/cpu.txt" || true
decide() {  # the profile's overrides of one sweep
  case "${PROFILE:-}:$1" in
    decide:reverse_activation) echo "sweep.screen_seeds=64 sweep.max_seeds=32" ;;
    decide:removal) echo "dataset.limit=12" ;;
  esac
}
for sweep in ${SWEEPS:-critical_step removal reverse_activation mechanisms attention_maps methods}; do
  echo "== $sweep $(date -Is) $(decide $sweep)"
  /usr/bin/time -f "$sweep: %e s wall" -a -o "$out/times.txt" \
    .venv/bin/python -m negstudy +sweep=$sweep $(decide $sweep) hydra.sweep.dir="$out/$sweep" hydra.run.dir="$out/$sweep" \
    > "$out/$sweep.log" 2>&1
  echo "   exit $? $(tail -1 "$out/times.txt")"
done
.venv/bin/python -m negstudy.findings "$out"/*/ --archive docs/findings/runs
