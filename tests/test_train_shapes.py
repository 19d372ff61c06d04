"""scripts/train_shapes.py end to end on a tiny config: train, export, resume, load, forward."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
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

    # a fresh run into a directory that holds a checkpoint is refused (the script's main, in this process)
    with pytest.raises(SystemExit, match="already holds a checkpoint: pass --resume"):
        load_script().main(["--out", str(out), *TINY, "--steps", "5"])

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


# ---------------------------------------------------------------------------------------------
# the GPU recipe's code path, in process (no interpreter start-up per run): torch-rendered data,
# a compact package for a size-limited output folder, resume, assembly into a loadable model


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_shapes_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_package_resume_assemble_load(tmp_path, monkeypatch):
    import re

    from diffusers import DiffusionPipeline
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from negstudy.config import ModelConfig
    from negstudy.models import builtin_model_dir
    from negstudy.models import load_pipeline

    ts = load_script()
    run_dir, pkg, model = tmp_path / "run", tmp_path / "pkg", tmp_path / "assembled"
    recipe = [*TINY, "--data", "torch", "--package", str(pkg), "--lr-scaling", "sqrt", "--offset-noise", "0.2"]
    monkeypatch.setattr(sys, "argv", ["train_shapes.py", "--out", str(run_dir), *recipe])
    ts.main(["--out", str(run_dir), *recipe, "--steps", "3"])
    meta = json.loads((pkg / "meta.json").read_text())
    assert sorted(p.name for p in pkg.iterdir()) == sorted(set(ts.PACKAGE_FILES) - {"samples.png"})
    assert meta["run"]["images_seen"] == 12 and meta["negstudy"]["train_steps"] == 3
    assert meta["run"]["peak_lr"] == pytest.approx(5e-4 * (4 / 512) ** 0.5)
    assert meta["negstudy"]["offset_noise"] == 0.2 and meta["negstudy"]["zero_snr"] is False

    ts.main(["--out", str(run_dir), *recipe, "--steps", "5", "--resume", "--sample", "4"])
    files = sorted(pkg.iterdir())
    assert [p.name for p in files] == sorted(ts.PACKAGE_FILES)
    # what a size-limited output folder accepts: <= 8 plain files, <= 16 MiB each, plain names
    assert len(files) <= 8 and all(p.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)
    meta = json.loads((pkg / "meta.json").read_text())
    assert meta["negstudy"]["train_steps"] == 5 and meta["run"]["images_seen"] == 20
    assert len(meta["sample_captions"]) == 4 and meta["run"]["hardware"]["cpus"] >= 1
    assert [int(r["step"]) for r in read_log(pkg / "training_log.csv")] == [3, 5]

    ts.main(["--assemble", str(pkg), "--out", str(model)])
    # the assembled directory is the run's own export, file for file in the weights
    for sub, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        got, want = load_file(str(model / sub / name)), load_file(str(run_dir / "model" / sub / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert all(v.dtype == torch.float16 for v in got.values() if v.is_floating_point())
    assert json.loads((model / "model_index.json").read_text()) == json.loads((run_dir / "model" / "model_index.json").read_text())
    shipped = json.loads((builtin_model_dir("shapes") / "scheduler" / "scheduler_config.json").read_text())
    ours = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    shipped.pop("_diffusers_version"), ours.pop("_diffusers_version")
    assert ours == shipped  # the default cure leaves Stable Diffusion 2's scheduler untouched

    pipe = DiffusionPipeline.from_pretrained(str(model), vae=None, safety_checker=None, feature_extractor=None)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.vae is None
    pipe = load_pipeline(OmegaConf.structured(ModelConfig(name="next", path=str(model))), torch.device("cpu"))
    ids = pipe.tokenizer(["a ball on the sand"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        eps = pipe.unet(torch.randn(1, 3, 32, 32), 958, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
    assert eps.shape == (1, 3, 32, 32) and torch.isfinite(eps).all()


def test_assemble_names_what_a_package_lacks(tmp_path):
    ts = load_script()
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(SystemExit, match="unet.safetensors"):
        ts.main(["--assemble", str(tmp_path), "--out", str(tmp_path / "m")])


@pytest.mark.timeout(120)
def test_zero_snr_keeps_the_step_index_convention(tmp_path):
    from diffusers import PNDMScheduler

    ts = load_script()
    sd, zs = ts.inference_scheduler(False), ts.inference_scheduler(True)
    sd.set_timesteps(30)
    zs.set_timesteps(30)
    assert len(sd.timesteps) == 31 and torch.equal(sd.timesteps, zs.timesteps)
    assert sd.timesteps[0] == 958 and sd.timesteps[-1] == 1
    assert zs.config.prediction_type == "v_prediction" and zs.config.steps_offset == 1 and zs.config.skip_prk_steps
    train = ts.training_scheduler(True)
    assert float(train.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR (diffusers clamps to 2^-24)
    assert float(zs.alphas_cumprod[958]) ** 0.5 == pytest.approx(0.020, abs=0.002)  # the leak it leaves at step 0
    assert float(sd.alphas_cumprod[958]) ** 0.5 == pytest.approx(0.087, abs=0.002)
    # one PNDM pass calls the model 31 times and stays finite
    calls = 0
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in zs.timesteps:
        calls += 1
        x = zs.step(0.1 * x, t, x).prev_sample
    assert calls == 31 and torch.isfinite(x).all()

    # a tiny v-prediction run exports that scheduler, and it survives the round trip through its config
    out = tmp_path / "run"
    ts.main(["--out", str(out), *TINY, "--steps", "2", "--zero-snr", "--offset-noise", "0"])
    loaded = PNDMScheduler.from_pretrained(str(out / "model"), subfolder="scheduler")
    loaded.set_timesteps(30)
    assert loaded.config.prediction_type == "v_prediction" and torch.equal(loaded.timesteps, sd.timesteps)
    assert torch.allclose(loaded.alphas_cumprod, zs.alphas_cumprod)
    assert json.loads((out / "model" / "model_index.json").read_text())["negstudy"]["zero_snr"] is True


@pytest.mark.timeout(120)
def test_worker_data_path_still_trains(tmp_path):
    ts = load_script()
    out = tmp_path / "run"
    ts.main(["--out", str(out), *TINY, "--steps", "2", "--data", "workers", "--data-workers", "0"])
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["step"] == 2


@pytest.mark.timeout(120)
def test_text_encoder_once_per_distinct_caption_is_exact(tmp_path, capsys):
    # captions that name nothing: 4 distinct ones (+ the empty one) < batch 8, so the chunk's
    # distinct captions are encoded once per step and gathered
    ts = load_script()
    common = [*TINY[:-2], "--chunk-size", "64", "--batch-size", "8", "--steps", "2", "--warmup-steps", "1",
              "--world-kwargs", '{"p_named": 0.0, "p_named_attribute": 0.0}']
    ts.main(["--out", str(tmp_path / "dedup"), *common])
    assert "text encoder on its 5 distinct captions per step" in capsys.readouterr().out
    ts.main(["--out", str(tmp_path / "plain"), *common, "--text-dedup", "off"])
    assert "distinct captions" not in capsys.readouterr().out
    a = torch.load(tmp_path / "dedup" / "checkpoint" / "state.pt", weights_only=False)
    b = torch.load(tmp_path / "plain" / "checkpoint" / "state.pt", weights_only=False)
    torch.manual_seed(0)  # the script's initialisation: seed 0, then the modules
    init = dict(zip(("unet", "text_encoder"), (m.state_dict() for m in ts.build_models(a["model_config"]))))
    for key in ("unet", "text_encoder"):
        da = torch.cat([(a[key][k] - init[key][k]).flatten() for k in init[key]])
        db = torch.cat([(b[key][k] - init[key][k]).flatten() for k in init[key]])
        assert da.norm() > 0.01  # two Adam steps of lr 5e-4 moved the weights
        # the same update up to float summation order (Adam's first steps amplify it only where
        # a gradient is ~0); a wrong gather would change the text encoder's update entirely
        assert (da - db).norm() / da.norm() < 1e-2, key


def test_min_snr_weights_cap_the_x0_weight():
    ts = load_script()
    abar = torch.tensor([0.5, 10 / 11, 0.99])  # SNR 1, 10, 99
    eps = ts.min_snr_weights(abar, 5.0, v_prediction=False)
    assert torch.allclose(eps, torch.tensor([1.0, 0.5, 5 / 99]), atol=1e-5)
    v = ts.min_snr_weights(abar, 5.0, v_prediction=True)
    assert torch.allclose(v, torch.tensor([0.5, 5 / 11, 5 / 100]), atol=1e-5)


def test_probe_scores_world_images_and_rejects_wrong_captions():
    """The probe's scorer reads the world's own images as right, and the same images under other
    captions as wrong: it measures agreement, not a constant."""
    from negstudy.shapes.quality import score_images
    from negstudy.shapes.world import sample_dataset

    images, captions, _ = sample_dataset(48, seed=7)
    right = score_images(images, list(captions))
    assert right["object_recall"] >= 0.95 and right["background_right"] >= 0.95 and right["caption_exact"] >= 0.9
    assert right["object_recall_lo"] <= right["object_recall"] <= right["object_recall_hi"]
    wrong = score_images(images, list(captions[1:]) + [captions[0]])
    assert wrong["background_right"] < 0.6 and wrong["caption_exact"] < 0.5


def test_probe_rates_read_planted_maps_attributes_broken_images_and_removals():
    """The probe's new rates on the world's own images, where the truth is known: each attribute drawn when
    named, no broken image (a noise image is broken), a word map equal to its object's mask localizes and a
    flat map does not, and a negative image without X (with the named objects) counts as a clean removal."""
    import numpy as np

    from negstudy.shapes.world import ATTRIBUTES, sample_dataset

    ts = load_script()
    images, captions, scenes = sample_dataset(32, seed=11, p_named=1.0, p_counts=(0, 0.5, 0.5, 0))
    attr_images, attr_captions, _ = sample_dataset(48, seed=12, p_attribute=1.0, p_named_attribute=1.0,
                                                   p_counts=(0, 0, 1.0, 0))
    from negstudy.shapes import oracle

    verdicts = oracle.inspect_batch(images)
    planted = [{o: m.astype(np.float32) for o, m in v.objects.items()} for v in verdicts]
    flat = [{o: np.ones((32, 32), np.float32) for o in v.objects} for v in verdicts]
    # negatives: "X" on an image drawn without X: the same image back (X absent, named objects kept)
    jobs = [(i, next(o for o in ("ball", "sun", "box", "tree", "kite") if o not in s.object_names)) for i, s in enumerate(scenes)]
    r = ts.probe_rates(images, list(captions), planted, attr_images, list(attr_captions), jobs, images)
    for a in ATTRIBUTES:
        assert r[f"attribute_{a}_n"] > 0 and r[f"attribute_{a}"] >= 0.85, (a, r[f"attribute_{a}"])
    assert r["broken_images"] == 0.0 and r["broken_images_n"] == 32 + 48
    assert r["object_localization"] == 1.0 and r["object_localization_n"] >= 40
    assert r["object_removal"] == 1.0 and r["object_named_kept"] >= 0.95 and r["object_removal_n"] == 32
    r = ts.probe_rates(images, list(captions), flat, attr_images[:0], [], [], images[:0])
    assert r["object_localization"] == 0.0
    noise = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert all(ts.is_broken(v) for v in oracle.inspect_batch(noise))


@pytest.mark.timeout(150)
def test_text_length_cuts_the_padding_and_init_from_keeps_the_first_slots(tmp_path, monkeypatch):
    """--text-length 16 with --init-from: tokenizer and text encoder have 16 slots, and at step 0 the causal
    encoder's hidden states on them are the source's (the source's position embeddings, cut)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ts = load_script()
    ts.main(["--out", str(tmp_path / "src"), *TINY, "--steps", "1", "--progress", "lines"])
    src = tmp_path / "src" / "model"
    ts.main(["--out", str(tmp_path / "cut"), *TINY, "--steps", "1", "--lr", "0", "--ema-decay", "1",
             "--init-from", str(src), "--text-length", "16", "--progress", "lines"])
    cut = tmp_path / "cut" / "model"
    tok = CLIPTokenizer.from_pretrained(cut, subfolder="tokenizer")
    text_cut = CLIPTextModel.from_pretrained(cut, subfolder="text_encoder", torch_dtype=torch.float32)
    text_src = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", torch_dtype=torch.float32)
    assert tok.model_max_length == 16 and text_cut.config.max_position_embeddings == 16
    ids = tok(["a sun, a ball and a box on the sand, striped"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert ids.shape == (1, 16) and ids[0, -1] == tok.eos_token_id  # the world's longest caption fits, <eos> included
    with torch.no_grad():
        a = text_cut(ids).last_hidden_state
        b = text_src(torch.cat([ids, ids[:, -1:].repeat(1, 61)], 1)).last_hidden_state[:, :16]
    assert torch.allclose(a, b, atol=1e-2)  # fp16 export of the same weights


@pytest.mark.timeout(400)
def test_probe_inside_training_logs_keeps_best_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ts = load_script()
    out = tmp_path / "run"
    probe = ["--probe-every-minutes", "1e-6", "--probe-n", "4", "--probe-attribute-n", "1", "--min-snr", "5",
             "--progress", "lines", "--export-dtype", "fp32"]
    wall = time.monotonic()
    ts.main(["--out", str(out), *TINY, "--steps", "2", *probe])
    wall = time.monotonic() - wall
    rows = read_log(out / "probe.csv")
    assert [int(r["step"]) for r in rows] == [1, 2]  # one probe per step at this interval, none repeated at the end
    for r in rows:
        for k in ("object_recall", "background_right", "caption_exact"):
            assert 0.0 <= float(r[k + "_lo"]) <= float(r[k]) <= float(r[k + "_hi"]) <= 1.0
        for k in ts.PROBE_KEYS:  # the new columns too: a rate, or nan when nothing was there to count
            assert k in r and (r[k] == "nan" or 0.0 <= float(r[k]) <= 1.0)
        assert float(r["broken_images"]) >= 0.0  # 4 plain + 4 attribute images: never nothing to count
        assert float(r["probe_seconds"]) > 0 and int(r["images_seen"]) == 4 * int(r["step"])
    assert (out / "probe" / "step_0000002.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "probe" / "captions.txt").read_text().splitlines()) == 4
    best = json.loads((out / "best" / "model_index.json").read_text())["negstudy"]
    scores = [float(r["score"]) for r in rows]
    assert float(best["probe"]["score"]) == max(scores)
    assert read_log(out / "model" / "probe.csv") == rows
    # probe time is not training time: training time and probe time add up to no more than the wall time
    assert float(rows[-1]["train_minutes"]) * 60 + sum(float(r["probe_seconds"]) for r in rows) <= wall + 1.0
    # the probe of an exported model (a baseline for plot_probe): the best weights give that probe's rates and images
    first_best = next(r for r in rows if float(r["score"]) == max(scores))
    ts.main(["--out", str(tmp_path / "baseline"), "--probe-model", str(out / "best"), "--probe-n", "4",
             "--probe-attribute-n", "1", "--device", "cpu"])
    baseline = json.loads((tmp_path / "baseline" / "probe_baseline.json").read_text())
    for k in ts.PROBE_KEYS:
        assert baseline[k] == pytest.approx(float(first_best[k]), abs=1e-4, nan_ok=True), k
    assert (tmp_path / "baseline" / "probe" / "baseline.png").read_bytes() == \
        (out / "probe" / f"step_{int(first_best['step']):07d}.png").read_bytes()
    with pytest.raises(SystemExit, match="not an exported model directory"):
        ts.main(["--out", str(tmp_path / "x"), "--probe-model", str(tmp_path)])

    ts.main(["--out", str(out), *TINY, "--steps", "3", "--resume", *probe])
    again = read_log(out / "probe.csv")
    assert again[:2] == rows and [int(r["step"]) for r in again] == [1, 2, 3]


@pytest.mark.timeout(180)
def test_sigterm_in_a_background_job_ends_in_a_clean_save(tmp_path):
    """`kill` (SIGTERM) and Ctrl-C save a checkpoint, even in a job a shell started with SIGINT ignored."""
    import signal

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), *TINY, "--minutes", "30",
                             "--progress", "lines", "--log-every", "1"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2 "):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert proc.returncode == 0, text[-3000:]
    assert "interrupted at step" in text
    step = json.loads((out / "checkpoint" / "progress.json").read_text())["step"]
    assert step >= 2 and json.loads((out / "model" / "model_index.json").read_text())["negstudy"]["train_steps"] == step
