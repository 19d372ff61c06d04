#!/usr/bin/env bash
# Set up a fresh machine for negstudy: a virtual environment with an editable install and the
# test extras, plus Debian's Chromium for the HTML-report test when it is missing and apt works.
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
