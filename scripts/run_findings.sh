#!/usr/bin/env bash
# Every sweep of the findings on the shipped model, one after another (one torch job at a time),
# each timed with /usr/bin/time; then the findings from their tables:
#   bash scripts/run_findings.sh [outputs/findings]     (~1 hour on a 2-core CPU)
# A sweep already finished is skipped by negstudy's job store; a killed one resumes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/findings}
mkdir -p "$out"
grep -m1 "model name" /proc/cpuinfo > "$out/cpu.txt" || true
for sweep in ${SWEEPS:-critical_step removal reverse_activation mechanisms attention_maps methods}; do
  echo "== $sweep $(date -Is)"
  /usr/bin/time -f "$sweep: %e s wall" -a -o "$out/times.txt" \
    .venv/bin/python -m negstudy +sweep=$sweep hydra.sweep.dir="$out/$sweep" hydra.run.dir="$out/$sweep" \
    > "$out/$sweep.log" 2>&1
  echo "   exit $? $(tail -1 "$out/times.txt")"
done
.venv/bin/python -m negstudy.findings "$out"/*/ --archive docs/findings/runs
