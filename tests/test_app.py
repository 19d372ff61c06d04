"""`python -m negstudy` end to end in a subprocess: the files a job writes, and bad input."""

import subprocess
import sys

import pandas as pd
from PIL import Image


def run_app(*args, cwd):
    return subprocess.run([sys.executable, "-m", "negstudy", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_window_job_writes_images_and_tables(tiny_model_dir, tmp_path):
    out = tmp_path / "job"
    proc = run_app(
        f"model.path={tiny_model_dir}", "model.name=tiny", "evaluator=none", "schedule=window",
        "schedule.start=2", "schedule.end=4", "steps=6", "seeds=[0,1]", "dataset.limit=2", "batch_size=3",
        "record=[eps]", f"hydra.run.dir={out}", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"4 images -> {out}" in proc.stdout
    last = [line for line in proc.stdout.splitlines() if line.startswith("negstudy:")][-1]
    assert last == "negstudy: outputs -> job; report -> none (a generation job writes images and tables only)"
    images = pd.read_parquet(out / "images.parquet")
    assert len(images) == 4 and set(images.seed) == {0, 1} and images.pair.nunique() == 2
    assert (images.n_calls == 7).all() and (images.schedule == "window(start=2,end=4)").all()
    steps = pd.read_parquet(out / "steps.parquet")
    assert len(steps) == 4 * 7
    per_step = steps[steps.image_id == 0].sort_values("step").branch.tolist()
    assert per_step == ["empty", "empty", "negative", "negative", "negative", "empty", "empty"]
    png = Image.open(out / images.file[0])
    assert png.size == (32, 32)  # tiny VAE model: 16x16 latents
    assert png.text["prompt"] == images.prompt[0] and png.text["schedule"] == "window(start=2,end=4)"
    assert png.text["negative"] == images.negative[0] and png.text["seed"] == "0" and png.text["model"] == "tiny"
    assert (out / "config.yaml").read_text().count("start: 2") == 1
    from safetensors.torch import load_file

    tensors = load_file(out / "tensors.safetensors")
    assert tensors["eps_positive/0"].shape == (7, 4, 16, 16)
    assert (out / "negstudy.log").exists() or any(out.glob("*.log"))


def test_bad_input_is_one_line_and_exit_code_2(tiny_model_dir, tmp_path):
    proc = run_app(f"model.path={tiny_model_dir}", "schedule=window", "schedule.start=12", "schedule.end=40",
                   f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err == ["negstudy: error: schedule.end=40: a step index must be in [0, 30] (31 UNet calls)"]
    assert not (tmp_path / "bad" / "images.parquet").exists()


def test_wandb_offline_run_reads_back_and_online_without_key_refuses(tiny_model_dir, tmp_path):
    import os

    from negstudy.tracking import read_offline_run

    out = tmp_path / "wb"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc credentials
    proc = subprocess.run(
        [sys.executable, "-m", "negstudy", f"model.path={tiny_model_dir}", "model.name=tiny", "evaluator=none", "logger=wandb",
         "steps=4", "seeds=[0]", "dataset.limit=1", f"hydra.run.dir={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((out / "wandb").glob("offline-run-*"))
    run = read_offline_run(run_dir)
    assert run["config"]["steps"] == 4 and run["config"]["model"]["name"] == "tiny"
    assert run["job_type"] == "generate" and run["group"].startswith("single:")
    steps = [row["step"] for row in run["history"] if "guidance_norm" in row]
    assert steps == [0, 1, 2, 3, 4]  # PNDM: 5 calls
    assert run["summary"]["n_images"] == 1
    online = subprocess.run(
        [sys.executable, "-m", "negstudy", f"model.path={tiny_model_dir}", "logger=wandb", "logger.mode=online",
         f"hydra.run.dir={tmp_path / 'online'}"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert online.returncode == 2
    assert online.stderr.strip() == "negstudy: error: logger.mode='online': no W&B credentials (set WANDB_API_KEY, or use logger.mode=offline and `wandb sync` later)"
