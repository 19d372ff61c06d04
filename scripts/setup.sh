#!/usr/bin/env bash
# Set up a fresh machine for negstudy: a virtual environment with an editable install and the
# test extras, plus Debian's Chromium for the HTML-report test and a single-node SLURM (slurmctld,
# slurmd, munge: tests/test_slurm.py starts it with scripts/slurm_single_node.sh) when they are
# missing and apt works. apt failing never fails the setup: those tests then skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -e '.[test]'
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  else
    echo "setup: Chromium is missing; install Debian's chromium package to run the HTML-report test" >&2
  fi
fi
if ! command -v sbatch >/dev/null 2>&1 || ! PATH=$PATH:/usr/sbin command -v slurmctld >/dev/null 2>&1; then
  slurm="slurmctld slurmd slurm-client munge"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends $slurm >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $slurm >/dev/null 2>&1; } \
      || echo "setup: could not install $slurm with apt-get; the SLURM test will skip" >&2
  else
    echo "setup: SLURM is missing; install Debian's $slurm to run the SLURM test (as root)" >&2
  fi
fi
