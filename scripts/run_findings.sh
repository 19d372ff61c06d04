#!/usr/bin/env bash
# Every sweep of the findings on the shipped model, one after another (one torch job at a time),
# each timed with /usr/bin/time; then the findings from their tables:
#   bash scripts/run_findings.sh [outputs/findings]     (~1 hour on a 2-core CPU)
# A sweep already finished is skipped by negstudy's job store; a killed one resumes.
#
# PROFILE=decide runs the studies of the claims still "inconclusive at this n" at the n their
# "n to decide" column asks for (docs/findings.md), each as the same two-shard multirun (a cluster
# raises dataset.shards): reverse activation on 6 pairs x 32 seeds where the negative's object is
# absent (192 pair-seeds: 0 appearances put the Wilson bound under the rule's 2 %; 71 min on a 2-core
# AMD EPYC at 46 UNet rows/s), removal on the 24 captions of dataset=shapes_removal_all x 36 seeds
# (57 min at 37 rows/s; it decided both preferences and the adaptive window's ratio). The fixed
# window's ratio sits 4 points from its band's edge (~144 captions): a cluster's job (dataset.shards).
#   PROFILE=decide SWEEPS="reverse_activation removal" bash scripts/run_findings.sh outputs/decide
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/findings}
mkdir -p "$out"
grep -m1 "model name" /proc/cpuinfo > "$out/cpu.txt" || true
# the draw's speed beside the CPU's name (machines of this kind differ up to 2x): the shapes UNet's rows/s
OMP_NUM_THREADS=2 .venv/bin/python scripts/draw_speed.py 2>/dev/null | grep "rows/s" >> "$out/cpu.txt" || true
decide() {  # the profile's overrides of one sweep
  case "${PROFILE:-}:$1" in
    decide:reverse_activation) echo "sweep.screen_seeds=64 sweep.max_seeds=32" ;;
    decide:removal) echo "dataset=shapes_removal_all dataset.limit=null" ;;
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
