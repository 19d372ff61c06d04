"""The configs travel with a regular (non-editable) install: build the wheel, run the app from it."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_configs_and_the_app_runs_from_it(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("negstudy-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for cfg in ("config.yaml", "model/shapes.yaml", "schedule/window.yaml", "sweep/critical_step.yaml"):
        assert f"negstudy/conf/{cfg}" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    code = "import negstudy.conf, sys; print(negstudy.conf.__file__)"
    where = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(target))
    proc = subprocess.run([sys.executable, "-m", "negstudy", "schedule=window", "--cfg", "job"], env=env, cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "name: window" in proc.stdout and "end: 15" in proc.stdout
