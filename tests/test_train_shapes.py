"""scripts/train_shapes.py end to end on a tiny config: train, export, resume, load, forward."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_shapes.py"
TINY = ["--batch-size", "4", "--unet-channels", "32,32,32", "--text-layers", "1", "--text-width", "32",
        "--device", "cpu", "--chunk-size", "64"]


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")  # small CPUs stall with spinning threads
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *TINY, *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_log(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(150)
def test_train_export_resume_load(tmp_path):
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTokenizer

    out = tmp_path / "run"
    first = run(out, "--steps", "3")
    assert "UNet" in first.stdout and "params" in first.stdout
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["step"] == 3
    assert json.loads((out / "model" / "model_index.json").read_text())["negstudy"]["train_steps"] == 3

    # a fresh run into a directory that holds a checkpoint is refused
    env = dict(os.environ, OMP_NUM_THREADS="1")
    refused = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *TINY, "--steps", "5"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--resume" in (refused.stdout + refused.stderr)

    second = run(out, "--resume", "--steps", "5", "--sample", "2")
    assert "resumed" in second.stdout and "at step 3" in second.stdout
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["step"] == 5
    log = read_log(out / "model" / "training_log.csv")
    assert [int(r["step"]) for r in log] == [3, 5]
    assert float(log[-1]["elapsed_s"]) >= float(log[0]["elapsed_s"])
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = out / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == [None, None] and index["requires_safety_checker"] is False
    meta = index["negstudy"]
    assert meta["pixel_space"] is True and meta["resolution"] == 32 and meta["world"] == "shapes"
    assert meta["train_steps"] == 5 and meta["batch_size"] == 4 and meta["device"] == "cpu" and meta["seed"] == 0

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32)
    text = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=torch.float32)
    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    sched = PNDMScheduler.from_pretrained(model, subfolder="scheduler")
    with safe_open(str(model / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # --export-dtype fp16 default

    assert sched.config.skip_prk_steps and sched.config.steps_offset == 1 and not sched.config.set_alpha_to_one
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.num_train_timesteps == 1000
    assert unet.config.in_channels == unet.config.out_channels == 3 and unet.config.sample_size == 32
    assert unet.config.cross_attention_dim == text.config.hidden_size == 32
    assert text.config.vocab_size == len(tok)

    from negstudy.shapes.world import VOCABULARY

    word = VOCABULARY[0]
    assert len(tok(word, add_special_tokens=False).input_ids) == 1
    ids = tok(["", f"a {word}"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (2, 77)
    with torch.no_grad():
        cond = text(ids).last_hidden_state
        eps = unet(torch.randn(2, 3, 32, 32), torch.tensor([999, 10]), encoder_hidden_states=cond).sample
    assert cond.shape == (2, 77, 32)
    assert eps.shape == (2, 3, 32, 32) and torch.isfinite(eps).all()
