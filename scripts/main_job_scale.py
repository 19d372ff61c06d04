#!/usr/bin/env python
"""The main job (``+sweep=critical_step``) at the real size of Stable Diffusion 2 base or SDXL base: time and
peak memory per pair-seed, measured at reduced steps, projected to the paper's 30 steps.

The model is the real configuration with random weights (``scripts/bench.py``'s ``real_pipeline``: SD 2
base's UNet, VAE and 23-layer OpenCLIP text encoder at 512 px; SDXL's UNet, VAE and two text encoders at
1024 px); no weights are needed to time them. The study is the real one (``negstudy.studies.critical_step.run``
on the overlay's config, composed by Hydra) on one pair and one seed, every start step (stride 1), read by a
real CLIP (the shipped shapes CLIP through ``evaluator=clip``, negstudy.evaluators.reader) under the paper's
unscreened protocol (``sweep.screen=false``): per pair-seed the plain image with its trajectory kept, k = 0
with cross-attention recorded in both branches, and every delayed start continuing the plain trajectory.

Measured: wall time of the job; UNet rows and the UNet's own time (forward hooks); the rest per image
(VAE decode, CLIP read); peak resident memory of the process (ru_maxrss) and, on CUDA, peak allocated;
the attention recorder's memory (``AttentionRecorder.nbytes``) for one image over all steps at the model's
latent grid (64x64 for SD2 at 512 px, 128x128 for SDXL at 1024 px). Projected to the paper's sizes (31 UNet
calls, stride 5 as the overlay): UNet rows per pair-seed x seconds per row + images x seconds per image.

    python scripts/main_job_scale.py --model sd2 --steps 2                 # ~2 min on a 2-core CPU
    python scripts/main_job_scale.py --model sdxl --steps 1
    python scripts/main_job_scale.py --model sd2 --steps 30 --stride 5 --device cuda --out $OUT/main_job_sd2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))
sys.path.insert(0, str(_REPO / "scripts"))

PAPER_CALLS, PAPER_STRIDE = 31, 5


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("sd2", "sdxl"), default="sd2")
    ap.add_argument("--steps", type=int, default=2, help="inference steps of the measured run (PNDM: steps + 1 UNet calls)")
    ap.add_argument("--stride", type=int, default=1, help="start-step stride of the measured run")
    ap.add_argument("--size", type=int, default=None, help="image side in px (default the model's native 512 / 1024)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)

    from hydra import compose, initialize_config_module

    from bench import machine, real_pipeline
    from negstudy.attention import AttentionRecorder
    from negstudy.config import register_configs
    from negstudy.evaluators.reader import study_reader
    from negstudy.sampler import Batch, NegativeSampler
    from negstudy.schedules import Always
    from negstudy.studies import critical_step

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    register_configs()
    with initialize_config_module("negstudy.conf", version_base=None):
        cfg = compose("config", overrides=[
            "+sweep=critical_step", "dataset=shapes_critical", "dataset.limit=1", "dataset.shards=1", "seeds=[6463344]",
            "sweep.screen=false", f"sweep.stride={args.stride}", f"steps={args.steps}", "save_images=false", "logger=none",
            "evaluator=clip", "evaluator.path=builtin:shapes_clip", "batch_size=8", "fixed_rows=auto"])
    reader = study_reader(cfg.evaluator, None)  # a real CLIP, read as on any real model

    t0 = time.perf_counter()
    pipe = real_pipeline(args.model, device, dtype, args.size)
    sampler = NegativeSampler(pipe, steps=args.steps, guidance_scale=7.5, fixed_rows=cfg.fixed_rows)
    build_s = time.perf_counter() - t0
    # the recorder's memory for one image over every step, at the model's latent grid; also the warm-up
    # (first calls pay one-time costs) before the timed job
    pair = critical_step.pairs_of(cfg.dataset)[0]
    recorder = AttentionRecorder(sampler.unet, words=[pair.negative, critical_step.positive_word_of(pair.prompt)])
    sampler.generate(Batch([pair.prompt], [pair.negative], [0], [Always().plan(sampler.n_calls)]), [recorder])
    recorder_bytes = recorder.nbytes()
    latent = tuple(recorder.size)

    unet_s, rows = [0.0], []

    def pre(module, inputs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append(inputs[0].shape[0])
        unet_s.append(-time.perf_counter())

    def post(module, inputs, output):
        if device.type == "cuda":
            torch.cuda.synchronize()
        unet_s[-1] += time.perf_counter()

    hooks = [sampler.unet.register_forward_pre_hook(pre), sampler.unet.register_forward_hook(post)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        tables = critical_step.run(cfg, sampler, Path(out), reader=reader)
        wall = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    unet_time, n_rows = sum(unet_s[1:]), sum(rows)
    n_calls = sampler.n_calls
    starts = list(range(0, n_calls, args.stride)) + [n_calls]
    images = len(starts)  # the plain image, k = 0 and every delayed start: each decoded and read
    per_row = unet_time / n_rows
    per_image = (wall - unet_time) / images

    paper_starts = list(range(0, PAPER_CALLS, PAPER_STRIDE))
    paper_rows = 2 * PAPER_CALLS + sum(2 * (PAPER_CALLS - k) for k in paper_starts)  # plain + k = 0 + delayed, branched
    paper_images = len(paper_starts) + 1
    paper_ratio_only_rows = 2 * PAPER_CALLS  # evaluator=none, screen=false: k = 0 only
    result = {
        "model": args.model, "size": args.size or {"sd2": 512, "sdxl": 1024}[args.model], "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "machine": machine(device), "steps": args.steps, "n_calls": n_calls,
        "stride": args.stride, "build_s": build_s, "wall_s": wall, "unet_rows": n_rows, "unet_s": unet_time,
        "s_per_unet_row": per_row, "images": images, "s_per_image_besides_unet": per_image,
        "ratio_rows": int(len(tables["ratio"])), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "recorder_bytes_per_image": recorder_bytes, "recorder_latent_grid": latent, "recorder_steps": sampler.n_calls,
        "recorder_bytes_per_image_per_step": recorder_bytes / n_calls,
        "paper": {"n_calls": PAPER_CALLS, "stride": PAPER_STRIDE, "unet_rows_per_pair_seed": paper_rows,
                  "images_per_pair_seed": paper_images,
                  "projected_s_per_pair_seed": paper_rows * per_row + paper_images * per_image,
                  "projected_s_per_pair_seed_ratio_only": paper_ratio_only_rows * per_row + per_image,
                  "projected_h_20_pairs_x_10_seeds": 200 * (paper_rows * per_row + paper_images * per_image) / 3600,
                  "recorder_bytes_per_image": recorder_bytes / sampler.n_calls * PAPER_CALLS},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
