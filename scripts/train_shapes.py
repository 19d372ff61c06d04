#!/usr/bin/env python
"""Train the "shapes" text-to-image model: a pixel-space 32x32 RGB diffusion model.

A UNet2DConditionModel (no VAE: it denoises the image itself, scaled to [-1, 1]) and a
CLIPTextModel, both trained from scratch and jointly, on captioned scenes that
`negstudy.shapes.world.sample_dataset` draws on the fly (fresh data in every chunk, never
repeated). The result is exported (EMA weights) as a diffusers-format directory laid out like
a Stable Diffusion checkpoint, `<out>/model/`, with unet/, text_encoder/, tokenizer/,
scheduler/ (Stable Diffusion 2 base's PNDM config) and model_index.json.

Data: by default (`--data torch`) the world is sampled, rendered and tokenised in torch on the
training device (`negstudy.shapes.render_torch`: the same distribution as the reference
`world.py`, pixel-exact for the same scenes), a chunk of `--chunk-size` images at a time;
`--data workers` keeps the older path (world.py in worker processes).

Budget-driven: `--minutes` (total training wall time, default 85) and/or `--steps` (total
optimizer steps). Both count over the whole run, resumed sessions included; the cosine decay of
the learning rate follows whichever budget is closer to exhaustion. `<out>/checkpoint/` is
written atomically every `--save-every-minutes` and at the end; `--resume` continues from it.

Examples:
    python scripts/train_shapes.py --out runs/shapes                 # 85 min, auto device
    python scripts/train_shapes.py --out runs/shapes --minutes 8 --batch-size 512 --sample 64
    python scripts/train_shapes.py --out runs/shapes --resume --minutes 120
    python scripts/train_shapes.py --out /tmp/t --steps 3 --batch-size 4 --device cpu \\
        --unet-channels 32,32,32 --text-layers 1 --text-width 32 --chunk-size 64
    # the GPU recipe (scripts/gpu_train.sh): a compact copy for a size-limited output folder,
    # then, on another machine, the full diffusers directory rebuilt from it
    python scripts/train_shapes.py --out /tmp/run --package $OUT --minutes 7.5 --batch-size 2048 \\
        --lr-scaling sqrt --offset-noise 0.2 --unet-channels 32,64,128 --sample 64
    python scripts/train_shapes.py --assemble path/to/package --out runs/shapes-next/model

Noise schedule (the background-colour cure): Stable Diffusion's scaled-linear betas leave
sqrt(abar) = 0.087 of the image in x_t at the first sampled timestep (958: PNDM, 30 steps,
leading spacing, steps_offset 1), and a 32x32 image's per-channel mean is then readable through
the noise (the mean of 1024 noise pixels has std 0.031), so an epsilon model trained without a
cure takes its background colour from the random mean of x_T. `--offset-noise S` (default 0.1)
adds a per-image, per-channel N(0, S^2) constant to the training noise, which hides that mean;
the exported scheduler stays byte-identical to SD2's, so every step index has SD's timestep AND
SD's noise level. `--zero-snr` (v-prediction on betas rescaled to zero terminal SNR) is offered
too; it keeps the 31 calls and their timesteps (the PNDM config carries the rescaled betas as
trained_betas) but changes the noise level at every step index, and with leading spacing it
never samples t = 999, so at t = 958 sqrt(abar) is still 0.020 and the leak is only reduced.

Imports only torch, numpy, tqdm, safetensors, diffusers, transformers, pandas/PIL (through
negstudy.records), the standard library and negstudy's world / tokenizer / records modules, so it
runs from a plain copy of the repository wherever those exist (e.g. diffusers on PYTHONPATH on a
GPU machine: scripts/gpu_train.sh).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import random
import shutil
import signal
import struct
import sys
import time
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # `python scripts/train_shapes.py` puts scripts/, not the repo, on the path
    sys.path.insert(0, str(_REPO))

import diffusers  # noqa: E402
from diffusers import DDPMScheduler, PNDMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from negstudy.records import atomic_path, find_checkpoint, fresh_tmp_dir, replace_dir, write_csv  # noqa: E402

MAX_LEN = 77  # token slots by default: Stable Diffusion's (--text-length changes it)
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
RESOLUTION_DEFAULT = 32
P_UNCOND = 0.1
EMA_DECAY = 0.999
WARMUP_STEPS = 500
LR_FLOOR = 0.1  # cosine decays to 10 % of the peak
SAMPLE_SEED = 1_000_003  # world seed of the fixed sample captions (never a training seed in practice)
LOG_HEADER = ["step", "loss", "lr", "elapsed_s", "loss_window"]
PROBE_SEED = 2_000_003  # world seed of the probe's captions (the measure protocol's draw, another seed)
PROBE_KEYS = ("object_recall", "background_right", "caption_exact", "attribute_recall", "images_with_unnamed_object",
              "attribute_blurry", "attribute_noisy", "attribute_dark", "attribute_striped", "broken_images",
              "object_localization", "object_removal", "object_named_kept")
PROBE_ATTRIBUTE_SEED = PROBE_SEED + 1  # world seed of the probe's attribute captions
BROKEN_UNKNOWN_PIXELS = 256  # a quarter of the image in no world colour (the world's own images: 0)
PROBE_HEADER = ["step", "train_minutes", "images_seen", "probe_seconds", "score"] + \
    [f"{k}{suffix}" for k in PROBE_KEYS for suffix in ("", "_lo", "_hi")] + [f"{k}_n" for k in PROBE_KEYS]
# the files a --package directory holds (a size-limited output folder: <= 8 files, flat)
PACKAGE_FILES = ("unet.safetensors", "text_encoder.safetensors", "training_log.csv", "meta.json", "samples.png")


# --------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output directory (checkpoint/, model/, tokenizer/, samples.png); "
                   "with --assemble: the model directory to write")
    p.add_argument("--assemble", type=Path, default=None, metavar="PKG",
                   help="no training: rebuild a full diffusers model directory at --out from a --package directory")
    p.add_argument("--package", type=Path, default=None, metavar="DIR",
                   help="at every save, also write a compact copy to DIR (flat, 5 files: " + ", ".join(PACKAGE_FILES) +
                        "); --assemble rebuilds the model from it")
    p.add_argument("--minutes", type=float, default=85.0, help="total training wall-time budget in minutes, resumed sessions included (<= 0: none; default 85)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: no step limit)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on CPU, 256 on CUDA")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint/ (model config comes from the checkpoint)")
    p.add_argument("--save-every-minutes", type=float, default=10.0)
    p.add_argument("--export-dtype", choices=("fp16", "fp32"), default="fp16", help="dtype of the exported unet/ and text_encoder/ weights")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="at the end, write a grid of N samples to <out>/samples.png (30 PNDM steps, CFG 7.5)")
    # optimisation
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate at --lr-base-batch (see --lr-scaling)")
    p.add_argument("--lr-scaling", choices=("none", "sqrt", "linear"), default="none",
                   help="scale --lr by (batch / --lr-base-batch)^(1/2 or 1): sqrt is the usual rule for Adam")
    p.add_argument("--lr-base-batch", type=int, default=512, help="the batch size --lr was tuned at (the shipped model's)")
    p.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=EMA_DECAY)
    p.add_argument("--offset-noise", type=float, default=0.1,
                   help="std of a per-image, per-channel constant added to the training noise (offset noise): without it a "
                        "32x32 pixel model reads the image mean colour from x_T and drifts to off-palette backgrounds")
    p.add_argument("--zero-snr", action="store_true",
                   help="train v-prediction on betas rescaled to zero terminal SNR; the exported PNDM keeps SD2's timesteps "
                        "and carries the rescaled betas (default off: offset noise is the cure, see the module docstring)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start a fresh run from the weights of an exported model directory (fine-tuning; same architecture)")
    p.add_argument("--p-uncond", type=float, default=P_UNCOND, help="probability of replacing the caption by \"\" (CFG dropout)")
    p.add_argument("--min-snr", type=float, default=0.0, metavar="GAMMA",
                   help="Min-SNR loss weighting (Hang et al. 2023): weight min(SNR, GAMMA) / SNR for epsilon, "
                        "min(SNR, GAMMA) / (SNR + 1) for v-prediction (0: plain MSE; 5 is the paper's value)")
    # quality probe
    p.add_argument("--probe-every-minutes", type=float, default=0.0, metavar="M",
                   help="every M training minutes (and at the end), sample --probe-n fixed captions from the EMA weights "
                        "(negstudy's sampler: PNDM 30 steps, guidance 7.5, fixed seeds), read them with the oracle, append "
                        "object recall, background right, caption-exact, each attribute drawn when named, broken images, "
                        "the localization rate (a named object's word map, mean of the last five steps, lift >= 2 on its "
                        "object: measured, never trained for), and the removal protocol of measure_shapes.py (negative "
                        "'X' from step 0 on the unnamed X: removed, named objects kept) to <out>/probe.csv, write "
                        "<out>/probe/step_*.png, and keep "
                        "the best-scoring EMA weights in <out>/best/ (0: off). Probe time is not training time.")
    p.add_argument("--probe-model", type=Path, default=None, metavar="DIR",
                   help="no training: run the probe (--probe-n, --probe-attribute-n) once on an exported model directory and "
                        "write <out>/probe_baseline.json and its contact sheets (the baseline of scripts/plot_probe.py)")
    p.add_argument("--probe-n", type=int, default=128, help="captions per probe (one image each)")
    p.add_argument("--probe-attribute-n", type=int, default=4, metavar="K",
                   help="per attribute, K more probe captions that name it (pooled with the --probe-n captions that do)")
    # model (ignored with --resume: the checkpoint's config is used)
    p.add_argument("--unet-channels", default="64,128,192", help="block_out_channels, comma-separated")
    p.add_argument("--unet-layers", type=int, default=2, help="layers_per_block")
    p.add_argument("--unet-heads", type=int, default=4, help="attention heads (diffusers' legacy attention_head_dim)")
    p.add_argument("--down-blocks", default="DownBlock2D,CrossAttnDownBlock2D,CrossAttnDownBlock2D")
    p.add_argument("--up-blocks", default="CrossAttnUpBlock2D,CrossAttnUpBlock2D,UpBlock2D")
    p.add_argument("--norm-groups", type=int, default=None, help="norm_num_groups (default: gcd(32, channels))")
    p.add_argument("--text-width", type=int, default=256, help="CLIP hidden size = UNet cross_attention_dim")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--text-ffn", type=int, default=None, help="CLIP intermediate size (default 4 x width)")
    p.add_argument("--text-length", type=int, default=MAX_LEN,
                   help="token slots of the tokenizer and text encoder (default 77, SD's). The world's longest caption "
                        "takes 16 with <bos> and <eos>; every slot after <eos> is padding the cross-attention can attend "
                        "to. With --init-from, the source's position embeddings are cut to the first --text-length (a "
                        "causal encoder gives the same hidden states on those slots)")
    # data / throughput
    p.add_argument("--data", choices=("torch", "workers"), default="torch",
                   help="torch: render on the training device (negstudy.shapes.render_torch); workers: world.py in processes")
    p.add_argument("--chunk-size", type=int, default=50_000, help="images per data chunk (fresh world seed per chunk)")
    p.add_argument("--part-size", type=int, default=5_000, help="images per generation job inside a chunk")
    p.add_argument("--data-workers", type=int, default=None, help="processes generating data (0: one background thread; default: min(8, cpus-2) on CUDA, 0 on CPU)")
    p.add_argument("--world-kwargs", default="{}", help="JSON dict of extra keyword arguments for sample_dataset")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress-bar/log updates (one host sync each)")
    p.add_argument("--progress", choices=("bar", "lines"), default="bar",
                   help="lines: one printed line per log row instead of a progress bar (short logs for captured output)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (unverified speed-up; off by default)")
    p.add_argument("--text-dedup", choices=("auto", "off"), default="auto",
                   help="auto: run the text encoder once per distinct caption of the chunk when there are fewer distinct "
                        "captions than the batch (the world has ~1.7k; exact, same gradients), else per sample")
    args = p.parse_args(argv)
    if args.assemble is not None:
        return args
    if args.lr_base_batch <= 0:
        p.error(f"--lr-base-batch {args.lr_base_batch}: must be a positive batch size")
    if (args.minutes is None or args.minutes <= 0) and args.steps is None:
        p.error("give --steps or a positive --minutes")
    return args


def len_of(tokenizer) -> int:
    """Token slots of the run: the tokenizer's model_max_length (77 unless --text-length)."""
    return int(tokenizer.model_max_length)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# models and schedulers


def model_config_from_args(args, tokenizer: CLIPTokenizer) -> dict:
    channels = tuple(int(c) for c in args.unet_channels.split(","))
    down = tuple(s.strip() for s in args.down_blocks.split(","))
    up = tuple(s.strip() for s in args.up_blocks.split(","))
    if not (len(channels) == len(down) == len(up)):
        raise SystemExit(f"--unet-channels ({len(channels)}), --down-blocks ({len(down)}), --up-blocks ({len(up)}) must have the same length")
    groups = args.norm_groups or math.gcd(32, *channels)
    if any(c % groups for c in channels):
        raise SystemExit(f"--norm-groups {groups} must divide every channel count {channels}")
    if any(c % args.unet_heads for c in channels):
        raise SystemExit(f"--unet-heads {args.unet_heads} must divide every channel count {channels}")
    if args.text_width % args.text_heads:
        raise SystemExit(f"--text-heads {args.text_heads} must divide --text-width {args.text_width}")
    unet = dict(
        sample_size=RESOLUTION_DEFAULT, in_channels=3, out_channels=3,
        block_out_channels=channels, layers_per_block=args.unet_layers,
        down_block_types=down, up_block_types=up,
        cross_attention_dim=args.text_width,
        attention_head_dim=args.unet_heads,  # legacy naming: this is the number of heads
        norm_num_groups=groups,
    )
    text = dict(
        vocab_size=len(tokenizer), hidden_size=args.text_width,
        intermediate_size=args.text_ffn or 4 * args.text_width,
        num_hidden_layers=args.text_layers, num_attention_heads=args.text_heads,
        max_position_embeddings=len_of(tokenizer), projection_dim=args.text_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return {"unet": unet, "text": text}


def model_config_from_dir(src: Path, tokenizer: CLIPTokenizer) -> dict:
    """The architecture of an exported model directory (for --init-from): its UNet and text-encoder
    configs, which override the --unet-* / --text-* flags. The vocabulary must be today's."""
    if not (src / "unet" / "config.json").is_file() or not (src / "text_encoder" / "config.json").is_file():
        raise SystemExit(f"--init-from {src}: not an exported model directory (needs unet/ and text_encoder/)")
    unet_cfg = UNet2DConditionModel.load_config(str(src), subfolder="unet")
    text_cfg = CLIPTextConfig.from_pretrained(str(src), subfolder="text_encoder").to_dict()
    if text_cfg["vocab_size"] != len(tokenizer):
        raise SystemExit(f"--init-from {src}: vocabulary of {text_cfg['vocab_size']} tokens, the world has {len(tokenizer)}")
    unet = {k: v for k, v in unet_cfg.items() if not k.startswith("_")}
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "projection_dim", "pad_token_id", "bos_token_id", "eos_token_id")
    text = {k: text_cfg[k] for k in keys if k in text_cfg}
    if text["max_position_embeddings"] < len_of(tokenizer):
        raise SystemExit(f"--init-from {src}: {text['max_position_embeddings']} token slots, fewer than --text-length {len_of(tokenizer)}")
    text["max_position_embeddings"] = len_of(tokenizer)  # cut to --text-length (text_state_for)
    return {"unet": unet, "text": text}


def text_state_for(state: dict, n_slots: int) -> dict:
    """A text encoder state dict with its position embeddings (and position ids) cut to the first ``n_slots``."""
    out = dict(state)
    for k, v in state.items():
        if k.endswith("position_embedding.weight"):
            out[k] = v[:n_slots]
        elif k.endswith("position_ids"):
            out[k] = v[..., :n_slots]
    return out


def build_models(cfg: dict):
    unet_kw = dict(cfg["unet"])
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        unet_kw[k] = tuple(unet_kw[k])
    unet = UNet2DConditionModel(**unet_kw)
    text = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    return unet, text


def training_scheduler(zero_snr: bool = False) -> DDPMScheduler:
    if zero_snr:
        return DDPMScheduler(**BETAS, prediction_type="v_prediction", clip_sample=False, rescale_betas_zero_snr=True)
    return DDPMScheduler(**BETAS, prediction_type="epsilon", clip_sample=False)


def inference_scheduler(zero_snr: bool = False) -> PNDMScheduler:
    """Stable Diffusion 2 base's scheduler_config.json exactly (30 steps = 31 UNet calls at timesteps
    958, 925, 925, 892, ..., 1: leading spacing, steps_offset 1, skip_prk_steps).

    zero_snr: the same timesteps and calls, v-prediction, and the zero-terminal-SNR betas of
    training_scheduler(True) as trained_betas (PNDM has no rescale option; its set_timesteps does
    not read the betas, and its leading timesteps never reach t = 999, where abar = 0)."""
    if zero_snr:
        betas = training_scheduler(True).betas.tolist()
        return PNDMScheduler(**BETAS, trained_betas=betas, prediction_type="v_prediction", skip_prk_steps=True,
                             steps_offset=1, set_alpha_to_one=False)
    return PNDMScheduler(**BETAS, prediction_type="epsilon", skip_prk_steps=True, steps_offset=1,
                         set_alpha_to_one=False)


def min_snr_weights(abar: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., ICCV 2023) for the timesteps' alpha-bar: the x0-space
    weight SNR capped at gamma, expressed for the epsilon loss (min(SNR, gamma) / SNR) or the v loss
    (min(SNR, gamma) / (SNR + 1))."""
    snr = (abar / (1 - abar)).clamp_min(1e-8)
    return snr.clamp(max=gamma) / (snr + 1 if v_prediction else snr)


def scaled_lr(args) -> float:
    """--lr scaled from --lr-base-batch to --batch-size by --lr-scaling."""
    power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[args.lr_scaling]
    return args.lr * (args.batch_size / args.lr_base_batch) ** power


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def lr_at(args, step: int, elapsed: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine to LR_FLOOR x peak over the budget.

    Progress is the larger of step/steps and elapsed/minutes, whichever budgets are set."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    prog = 0.0
    if args.steps:
        prog = max(prog, step / args.steps)
    if args.minutes and args.minutes > 0:
        prog = max(prog, elapsed / (60.0 * args.minutes))
    prog = min(1.0, prog)
    return args.lr * warm * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * prog)))


# --------------------------------------------------------------------------------------------
# data: chunks of freshly sampled scenes, generated ahead in background workers


_WORKER_TOKENIZERS: dict[str, CLIPTokenizer] = {}


def part_seed(seed: int, chunk: int, part: int) -> int:
    return int(np.random.SeedSequence([seed, chunk, part]).generate_state(1)[0])


def make_part(n: int, seed: int, tokenizer_dir: str, world_kwargs: dict):
    """One generation job: n images (uint8 NHWC) and their captions tokenized to 77 ids."""
    from negstudy.shapes.world import sample_dataset

    tok = _WORKER_TOKENIZERS.get(tokenizer_dir)
    if tok is None:
        tok = _WORKER_TOKENIZERS[tokenizer_dir] = CLIPTokenizer.from_pretrained(tokenizer_dir)
    images, captions, _ = sample_dataset(n, seed=seed, **world_kwargs)
    ids = tok(list(captions), padding="max_length", max_length=len_of(tok), truncation=True, return_tensors="np").input_ids
    return np.ascontiguousarray(images, dtype=np.uint8), ids.astype(np.int32)


class ChunkSource:
    """Chunk c = parts p of `part_size` images, part p sampled with seed SeedSequence([seed, c, p]).

    The content depends only on (seed, chunk_size, part_size, c), not on the number of workers.
    `get(c)` blocks for chunk c and keeps the next `prefetch` chunks in flight."""

    def __init__(self, seed, chunk_size, part_size, tokenizer_dir, world_kwargs, workers, prefetch=2):
        self.seed, self.chunk_size, self.part_size = seed, chunk_size, min(part_size, chunk_size)
        self.tokenizer_dir, self.world_kwargs, self.prefetch = str(tokenizer_dir), world_kwargs, prefetch
        if workers > 0:
            self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        else:
            self.pool = ThreadPoolExecutor(1)
        self.pending: dict[int, list] = {}

    def _submit(self, c: int):
        if c in self.pending:
            return
        jobs = []
        for p, start in enumerate(range(0, self.chunk_size, self.part_size)):
            n = min(self.part_size, self.chunk_size - start)
            jobs.append(self.pool.submit(make_part, n, part_seed(self.seed, c, p), self.tokenizer_dir, self.world_kwargs))
        self.pending[c] = jobs

    def get(self, c: int):
        for k in range(c, c + self.prefetch + 1):
            self._submit(k)
        parts = [j.result() for j in self.pending.pop(c)]
        for k in [k for k in self.pending if k < c]:
            for j in self.pending.pop(k):
                j.cancel()
        return np.concatenate([x for x, _ in parts]), np.concatenate([i for _, i in parts])

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# EMA (diffusers EMAModel's warm-up: decay_t = min(decay, (1 + t) / (10 + t)))


class EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = [copy.deepcopy(m).requires_grad_(False).eval() for m in modules]
        self.src = [p for m in modules for p in m.parameters()]
        self.dst = [p for m in self.shadow for p in m.parameters()]

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.dst, self.src, 1.0 - d)

    def state_dict(self):
        return [m.state_dict() for m in self.shadow]

    def load_state_dict(self, states):
        for m, s in zip(self.shadow, states):
            m.load_state_dict(s)


# --------------------------------------------------------------------------------------------
# checkpoint, export, log








def save_checkpoint(out: Path, state: dict, log_rows: list[list]):
    final = out / "checkpoint"
    tmp = fresh_tmp_dir(final)
    torch.save(state, tmp / "state.pt")
    write_csv(tmp / "training_log.csv", LOG_HEADER, log_rows)
    (tmp / "progress.json").write_text(json.dumps({k: state[k] for k in ("step", "elapsed", "chunk", "pos")}, indent=1))
    replace_dir(tmp, final)




@torch.no_grad()
def cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A CPU copy with floating-point weights in `dtype` (tensor by tensor: no model-level .to() warnings)."""
    m = copy.deepcopy(module).cpu()
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    return m


def write_model_dir(final: Path, unet, text, dtype: torch.dtype, meta: dict, log_rows: list[list],
                    tokenizer_dir: Path, zero_snr: bool = False):
    """The diffusers directory (unet/, text_encoder/, tokenizer/, scheduler/, model_index.json,
    training_log.csv), written beside `final` and moved onto it at the end."""
    tmp = fresh_tmp_dir(final)
    cast_copy(unet, dtype).save_pretrained(tmp / "unet", safe_serialization=True)
    cast_copy(text, dtype).save_pretrained(tmp / "text_encoder", safe_serialization=True)
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    inference_scheduler(zero_snr).save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "vae": [None, None],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "negstudy": meta,
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_csv(tmp / "training_log.csv", LOG_HEADER, log_rows)
    replace_dir(tmp, final)


def export_model(out: Path, ema: EMA, dtype: torch.dtype, meta: dict, log_rows: list[list], zero_snr: bool = False):
    unet, text = ema.shadow
    write_model_dir(out / "model", unet, text, dtype, meta, log_rows, out / "tokenizer", zero_snr)


# --------------------------------------------------------------------------------------------
# package: the compact copy for a size-limited output folder, and its assembly


def _save_tensors(module: torch.nn.Module, path: Path, dtype: torch.dtype):
    from safetensors.torch import save_file

    sd = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp))


def write_package(pkg: Path, ema: EMA, dtype: torch.dtype, meta: dict, log_rows: list[list]):
    """PACKAGE_FILES minus samples.png: EMA weights as flat safetensors (state_dict keys of the
    diffusers / transformers modules), the log, and meta.json (model_config, negstudy meta, run
    facts). Each file is replaced atomically, so a kill leaves the previous save readable."""
    pkg.mkdir(parents=True, exist_ok=True)
    unet, text = ema.shadow
    _save_tensors(unet, pkg / "unet.safetensors", dtype)
    _save_tensors(text, pkg / "text_encoder.safetensors", dtype)
    write_csv(pkg / "training_log.csv", LOG_HEADER, log_rows)
    with atomic_path(pkg / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")


def assemble(pkg: Path, dest: Path) -> Path:
    """Rebuild the full diffusers directory at `dest` from a --package directory: model configs
    from meta.json, weights loaded strictly into freshly built modules, the tokenizer rebuilt from
    the world's vocabulary (checked against the text encoder's vocab size), the scheduler from
    inference_scheduler, and the log. Returns dest."""
    from safetensors.torch import load_file

    from negstudy.shapes.world import VOCABULARY
    from negstudy.tokenizer import save_clip_tokenizer

    pkg = Path(pkg)
    missing = [f for f in PACKAGE_FILES[:4] if not (pkg / f).exists()]
    if missing:
        raise SystemExit(f"--assemble {pkg}: missing {', '.join(missing)} (a package holds {', '.join(PACKAGE_FILES)})")
    meta = json.loads((pkg / "meta.json").read_text())
    unet, text = build_models(meta["model_config"])
    unet_sd = load_file(str(pkg / "unet.safetensors"))
    dtype = next(iter(v.dtype for v in unet_sd.values() if v.is_floating_point()))
    unet.load_state_dict(unet_sd)
    text.load_state_dict(load_file(str(pkg / "text_encoder.safetensors")))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tok_dir = dest.with_name(dest.name + ".tokenizer")
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tokenizer = save_clip_tokenizer(list(VOCABULARY), tok_dir, model_max_length=text.config.max_position_embeddings)
    if len(tokenizer) != text.config.vocab_size:
        raise SystemExit(f"--assemble: the rebuilt tokenizer has {len(tokenizer)} tokens, the text encoder {text.config.vocab_size}")
    with open(pkg / "training_log.csv", newline="") as f:
        log_rows = list(csv.reader(f))[1:]
    write_model_dir(dest, unet, text, dtype, meta["negstudy"], log_rows, tok_dir, bool(meta["negstudy"].get("zero_snr")))
    shutil.rmtree(tok_dir)
    if (pkg / "samples.png").exists():
        shutil.copy(pkg / "samples.png", dest / "samples.png")
    return dest


def hardware(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    hw = {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "diffusers": diffusers.__version__,
          "python": platform.python_version()}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
        hw["cuda"] = torch.version.cuda
    return hw


def rng_state(device: torch.device) -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(s: dict, device: torch.device):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


# --------------------------------------------------------------------------------------------
# sampling (own minimal CFG loop) and PNG writing


@torch.no_grad()
def sample_images(unet, text, tokenizer, captions: list[str], device, seed=0, steps=30, scale=7.5,
                  zero_snr=False) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) samples: the shipped PNDM (30 steps = 31 UNet calls), CFG `scale`."""
    sched = inference_scheduler(zero_snr)
    sched.set_timesteps(steps)
    n = len(captions)
    ids = tokenizer([""] * n + list(captions), padding="max_length", max_length=len_of(tokenizer), truncation=True,
                    return_tensors="pt").input_ids.to(device)
    cond = text(ids).last_hidden_state
    res = unet.config.sample_size
    x = torch.randn((n, unet.config.in_channels, res, res), generator=torch.Generator().manual_seed(seed)).to(device)
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        eps_u, eps_c = unet(xin, t, encoder_hidden_states=cond).sample.chunk(2)
        x = sched.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def write_png(path: Path, img: np.ndarray):
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def image_grid(images: np.ndarray, upscale=4, pad=2) -> np.ndarray:
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    H, W = h * upscale, w * upscale
    grid = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        big = im.repeat(upscale, 0).repeat(upscale, 1)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + q * (W + pad): pad + q * (W + pad) + W] = big
    return grid


# --------------------------------------------------------------------------------------------
# quality probe: the oracle's reading of fixed samples from the EMA weights


def probe_captions(n: int) -> list[str]:
    """The probe's fixed captions: the world's own caption distribution (as scripts/measure_shapes.py) at PROBE_SEED."""
    from negstudy.shapes import world

    rng = np.random.default_rng(PROBE_SEED)
    return [world.caption(world.sample_scene(rng)) for _ in range(n)]


def probe_score(rates: dict) -> float:
    """One number to rank probes: the mean of object recall, background right and caption-exact."""
    return float(np.mean([rates["object_recall"], rates["background_right"], rates["caption_exact"]]))


def probe_attribute_captions(k: int) -> list[str]:
    """K fixed captions per attribute (ATTRIBUTES order) that name it: world scenes with an attribute, always named."""
    from negstudy.shapes import world

    rng = np.random.default_rng(PROBE_ATTRIBUTE_SEED)
    out: dict[str, list[str]] = {a: [] for a in world.ATTRIBUTES}
    while any(len(v) < k for v in out.values()):
        scene = world.sample_scene(rng, p_attribute=1.0, p_named_attribute=1.0)
        if len(out[scene.attribute]) < k:
            out[scene.attribute].append(world.caption(scene))
    return [c for a in world.ATTRIBUTES for c in out[a]]


def is_broken(verdict) -> bool:
    """A collapsed image: the oracle fits no world background (colour offset beyond its band) or finds a quarter
    of the pixels in no world colour (the "dark" collapse: saturated noise). The world's own images: never."""
    return verdict.background_state == "none" or verdict.diagnostics.get("unknown_pixels", 0.0) >= BROKEN_UNKNOWN_PIXELS


def word_lift(heat: np.ndarray, region: np.ndarray) -> float:
    """Lift of a word's map on a region: its mass there over a uniform map's (negstudy.critical.HIT_LIFT rule)."""
    from negstudy.attention import mass_in_mask

    return mass_in_mask(heat, region) / float(region.mean())


def probe_rates(images, captions, last_maps, attr_images, attr_captions, neg_jobs, neg_images) -> dict:
    """The probe's rates with 95 % Wilson intervals, from images already read by nobody.

    images / captions: the plain probe (no negative). last_maps: per plain image, {object word: (h, w) mean map of
    the last five steps, positive branch}. attr_images / attr_captions: the attribute captions. neg_jobs: (plain
    image index, unnamed object X) and neg_images their images with the negative "X" at every step (the
    measure_shapes.py protocol). Measured only: nothing here feeds a loss."""
    from negstudy.critical import HIT_LIFT
    from negstudy.shapes import oracle, world
    from negstudy.shapes.quality import rates, tally

    verdicts = oracle.inspect_batch(images)
    specs = [world.parse_caption(c) for c in captions]
    counts, _, _ = tally(verdicts, specs)
    attr_verdicts = oracle.inspect_batch(attr_images) if len(attr_images) else []
    drawn = {a: [0, 0] for a in world.ATTRIBUTES}
    for v, c in list(zip(verdicts, captions)) + list(zip(attr_verdicts, attr_captions)):
        a = world.parse_caption(c).attribute
        if a is not None:
            drawn[a][0] += v.attribute == a
            drawn[a][1] += 1
    counts.update({f"attribute_{a}": tuple(k) for a, k in drawn.items()})
    every = list(verdicts) + list(attr_verdicts)
    counts["broken_images"] = (sum(is_broken(v) for v in every), len(every))
    hits = [word_lift(maps[o], v.objects[o]) >= HIT_LIFT
            for maps, v, sp in zip(last_maps, verdicts, specs) for o in sp.objects if v.present(o) and o in maps]
    counts["object_localization"] = (sum(hits), len(hits))
    neg_verdicts = oracle.inspect_batch(neg_images) if len(neg_images) else []
    counts["object_removal"] = (sum(not v.present(x) for (_, x), v in zip(neg_jobs, neg_verdicts)), len(neg_jobs))
    counts["object_named_kept"] = (sum(all(v.present(o) for o in specs[i].objects) for (i, _), v in zip(neg_jobs, neg_verdicts)),
                                   len(neg_jobs))
    return rates(counts)


def probe_sampler(unet, text, tokenizer, zero_snr: bool):
    """negstudy's sampler (the studies' loop: PNDM 30 steps = 31 UNet calls, guidance 7.5) over these modules."""
    from diffusers import StableDiffusionPipeline

    from negstudy.sampler import NegativeSampler

    pipe = StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=inference_scheduler(zero_snr), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return NegativeSampler(pipe, steps=30, guidance_scale=7.5)


@torch.no_grad()
def run_probe(unet, text, tokenizer, captions: list[str], device, zero_snr: bool, attribute_captions=(), batch: int = 64):
    """(uint8 plain images (N, 32, 32, 3), uint8 attribute images, rates with Wilson intervals).

    Plain images: caption i with seed PROBE_SEED + i, no negative, cross-attention recorded (object words, positive
    branch) for the localization rate; attribute captions: seed PROBE_ATTRIBUTE_SEED + i; then the negative "X" at
    every step on the plain seeds where the oracle saw X unnamed (object removal, named objects kept)."""
    from negstudy.attention import AttentionRecorder
    from negstudy.records import to_uint8
    from negstudy.sampler import Batch
    from negstudy.schedules import Always, Never
    from negstudy.shapes import oracle, world

    sampler = probe_sampler(unet, text, tokenizer, zero_snr)
    n_calls = sampler.n_calls
    plain, last_maps = [], []
    for i in range(0, len(captions), batch):
        part = captions[i: i + batch]
        rec = AttentionRecorder(unet, words=list(world.OBJECT_NAMES))
        b = Batch(list(part), [""] * len(part), [PROBE_SEED + i + j for j in range(len(part))], [Never().plan(n_calls)] * len(part))
        plain.append(to_uint8(sampler.generate(b, [rec])))
        for j in range(len(part)):
            last_maps.append({w: rec.maps(j, "positive", w)[n_calls - 5:].float().mean(0).numpy()
                              for w in rec.words_of(j, "positive")})
    plain = np.concatenate(plain)

    def generate(texts, negatives, seeds, schedule):
        out = [to_uint8(sampler.generate(Batch(list(texts[i: i + batch]), list(negatives[i: i + batch]),
                                               list(seeds[i: i + batch]), [schedule.plan(n_calls)] * len(texts[i: i + batch]))))
               for i in range(0, len(texts), batch)]
        return np.concatenate(out) if out else np.zeros((0, *plain.shape[1:]), np.uint8)

    attr = list(attribute_captions)
    attr_imgs = generate(attr, [""] * len(attr), [PROBE_ATTRIBUTE_SEED + i for i in range(len(attr))], Never())
    specs = [world.parse_caption(c) for c in captions]
    jobs = [(i, o) for i, (v, sp) in enumerate(zip(oracle.inspect_batch(plain), specs)) for o in v.objects if o not in sp.objects]
    neg_imgs = generate([captions[i] for i, _ in jobs], [x for _, x in jobs], [PROBE_SEED + i for i, _ in jobs], Always())
    return plain, attr_imgs, probe_rates(plain, captions, last_maps, attr_imgs, attr, jobs, neg_imgs)


# --------------------------------------------------------------------------------------------
# training


def probe_model(args) -> dict:
    """The probe of an exported model (``--probe-model DIR``): the same captions, seeds and rates as a training
    run's probe, written to <out>/probe_baseline.json with its contact sheets."""
    src: Path = args.probe_model
    if not (src / "unet").is_dir() or not (src / "text_encoder").is_dir():
        raise SystemExit(f"--probe-model {src}: not an exported model directory (needs unet/ and text_encoder/)")
    device = resolve_device(args.device)
    tokenizer = CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
    unet = UNet2DConditionModel.from_pretrained(str(src), subfolder="unet").float().to(device).eval()
    text = CLIPTextModel.from_pretrained(str(src), subfolder="text_encoder").float().to(device).eval()
    sched = json.loads((src / "scheduler" / "scheduler_config.json").read_text()) if (src / "scheduler").is_dir() else {}
    zero_snr = bool(sched.get("rescale_betas_zero_snr", False))
    captions, attr = probe_captions(args.probe_n), probe_attribute_captions(args.probe_attribute_n)
    t = time.monotonic()
    imgs, attr_imgs, r = run_probe(unet, text, tokenizer, captions, device, zero_snr, attr)
    out: Path = args.out
    (out / "probe").mkdir(parents=True, exist_ok=True)
    write_png(out / "probe" / "baseline.png", image_grid(imgs))
    if len(attr_imgs):
        write_png(out / "probe" / "baseline_attributes.png", image_grid(attr_imgs))
    result = {"model": str(src), "probe_n": args.probe_n, "probe_attribute_n": args.probe_attribute_n,
              "seconds": round(time.monotonic() - t, 1), "score": probe_score(r), **{k: float(v) for k, v in r.items()}}
    (out / "probe_baseline.json").write_text(json.dumps(result, indent=2))
    print(f"probe of {src}: " + ", ".join(f"{k} {r[k]:.1%}" for k in PROBE_KEYS) + f" -> {out / 'probe_baseline.json'}", flush=True)
    return result


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    args = parse_args(argv)
    if args.assemble is not None:
        dest = assemble(args.assemble, args.out)
        print(f"assembled {dest} from {args.assemble}", flush=True)
        return
    if args.probe_model is not None:
        probe_model(args)
        return
    # SIGINT and SIGTERM end training with a clean save: a shell starts background jobs with SIGINT
    # ignored (then Python installs no handler), and `kill` sends SIGTERM
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.batch_size is None:
        args.batch_size = 256 if cuda else 64
    lr_given = args.lr
    args.lr = scaled_lr(args)
    if args.lr_scaling != "none":
        print(f"peak lr {lr_given:g} at batch {args.lr_base_batch} -> {args.lr:.4g} at batch {args.batch_size} "
              f"({args.lr_scaling} scaling)", flush=True)
    if args.data_workers is None:
        args.data_workers = min(8, max(1, (os.cpu_count() or 2) - 2)) if cuda else 0
    args.chunk_size = max(args.chunk_size, args.batch_size)
    world_kwargs = json.loads(args.world_kwargs)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if cuda:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    from negstudy.shapes.world import VOCABULARY
    from negstudy.tokenizer import save_clip_tokenizer

    ckpt_dir = find_checkpoint(out)
    if args.resume:
        if ckpt_dir is None:
            raise SystemExit(f"--resume: no checkpoint in {out}/checkpoint")
        state = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=False)
        tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
        cfg = state["model_config"]
        if state["seed"] != args.seed:
            print(f"note: resuming with the checkpoint's seed {state['seed']} (not --seed {args.seed})")
            args.seed = state["seed"]
        if (state["chunk_size"], state["part_size"]) != (args.chunk_size, args.part_size):
            print(f"note: resuming with the checkpoint's chunk/part size {state['chunk_size']}/{state['part_size']}")
            args.chunk_size, args.part_size = state["chunk_size"], state["part_size"]
        if state["batch_size"] != args.batch_size:
            print(f"note: batch size {state['batch_size']} in the checkpoint, {args.batch_size} now")
        if state.get("zero_snr", False) != args.zero_snr:
            print(f"note: resuming with the checkpoint's noise schedule (zero_snr={state.get('zero_snr', False)})")
            args.zero_snr = state.get("zero_snr", False)
    else:
        if ckpt_dir is not None:
            raise SystemExit(f"{out} already holds a checkpoint: pass --resume, or choose another --out")
        state = None
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        tokenizer = save_clip_tokenizer(list(VOCABULARY), out / "tokenizer", model_max_length=args.text_length)
        tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
        if args.init_from is not None:
            cfg = model_config_from_dir(args.init_from, tokenizer)
        else:
            cfg = model_config_from_args(args, tokenizer)

    unet, text = build_models(cfg)
    if args.init_from is not None and state is None:
        src = args.init_from
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(str(src), subfolder="unet").float().state_dict())
        text.load_state_dict(text_state_for(CLIPTextModel.from_pretrained(str(src), subfolder="text_encoder").float().state_dict(),
                                            len_of(tokenizer)))
        print(f"initialised from {src}", flush=True)
    unet.to(device).train()
    text.to(device).train()
    nu, nt = n_params(unet), n_params(text)
    print(f"device {device} | UNet {nu / 1e6:.2f}M params | text encoder {nt / 1e6:.2f}M params | total {(nu + nt) / 1e6:.2f}M | "
          f"batch {args.batch_size} | vocab {len(tokenizer)}", flush=True)

    params = list(unet.parameters()) + list(text.parameters())
    opt_kw = dict(lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    if cuda:
        opt_kw["fused"] = True
    optimizer = torch.optim.AdamW(params, **opt_kw)
    ema = EMA([unet, text], args.ema_decay)

    step, elapsed_prev, chunk_idx, pos, perm = 0, 0.0, 0, 0, None
    log_rows: list[list] = []
    probe_rows: list[list] = []
    best_score = -1.0
    loss_smooth = None
    if state is not None:
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text_encoder"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_prev = state["step"], state["elapsed"]
        chunk_idx, pos, perm = state["chunk"], state["pos"], state["perm"]
        log_rows, loss_smooth = state["log"], state["loss_smooth"]
        probe_rows, best_score = state.get("probe", []), state.get("best_score", -1.0)
        probe_rows = [r + ["nan"] * (len(PROBE_HEADER) - len(r)) for r in probe_rows]  # a checkpoint of fewer probe columns
        set_rng_state(state["rng"], device)
        print(f"resumed from {ckpt_dir} at step {step} ({elapsed_prev / 60:.1f} min trained)", flush=True)
    fwd_unet = torch.compile(unet) if args.compile else unet

    sched = training_scheduler(args.zero_snr)
    ac = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
    sqrt_ac, sqrt_1m_ac = ac.sqrt(), (1 - ac).sqrt()
    empty_ids = tokenizer("", padding="max_length", max_length=len_of(tokenizer), return_tensors="pt").input_ids.to(device)
    B = args.batch_size

    if args.data == "torch":
        from negstudy.shapes.render_torch import CaptionTokens, make_batch

        source = None
        caption_tokens = CaptionTokens(tokenizer, len_of(tokenizer))
    else:
        source = ChunkSource(args.seed, args.chunk_size, args.part_size, out / "tokenizer", world_kwargs, args.data_workers)

    def load_chunk(c: int):
        """Chunk c: uint8 NCHW images and (N, 77) ids on the device, plus the text encoder's inputs:
        (rows to encode, index of each image's row, index of the empty caption's row)."""
        if source is None:
            gen = torch.Generator(device=device).manual_seed(part_seed(args.seed, c, 0))
            imgs, ids = make_batch(args.chunk_size, gen, caption_tokens, **world_kwargs)
        else:
            imgs, ids = source.get(c)
            imgs = torch.from_numpy(imgs).to(device).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW, stays on device
            ids = torch.from_numpy(ids).to(device=device, dtype=torch.long)
        rows, inverse = torch.unique(torch.cat([ids, empty_ids]), dim=0, return_inverse=True)
        if args.text_dedup == "auto" and len(rows) < B:
            return imgs, ids, (rows, inverse[:-1], inverse[-1])
        return imgs, ids, None

    t0 = time.monotonic()
    chunk_imgs, chunk_ids, chunk_text = load_chunk(chunk_idx)
    if perm is None or pos + B > len(perm):
        perm, pos = torch.randperm(len(chunk_imgs)), 0
    perm_dev = perm.to(device)
    dedup = f"; text encoder on its {len(chunk_text[0])} distinct captions per step" if chunk_text is not None else ""
    print(f"first data chunk ({len(chunk_imgs)} images) ready in {time.monotonic() - t0:.1f}s{dedup}", flush=True)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    export_dtype = torch.float16 if args.export_dtype == "fp16" else torch.float32

    def meta():
        return {"pixel_space": True, "resolution": int(unet.config.sample_size), "world": "shapes",
                "train_steps": step, "train_minutes": round(elapsed() / 60, 3), "batch_size": B,
                "device": torch.cuda.get_device_name(device) if cuda else "cpu", "seed": args.seed,
                "offset_noise": args.offset_noise, "zero_snr": args.zero_snr, "images_seen": step * B,
                "init_from": str(args.init_from) if args.init_from else None}

    hw = hardware(device)

    def package_meta(extra: dict | None = None) -> dict:
        el = elapsed()
        run = {"command": [Path(sys.executable).name, *sys.argv], "hardware": hw, "images_seen": step * B,
               "train_seconds": round(el, 1), "steps_per_s": round(step / max(el, 1e-9), 3),
               "images_per_s": round(step * B / max(el, 1e-9), 1), "peak_lr": args.lr, "data": args.data,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        return {"model_config": cfg, "negstudy": meta(), "run": run, **(extra or {})}

    t_start = time.monotonic()

    def elapsed() -> float:
        return elapsed_prev + time.monotonic() - t_start

    def save():
        st = {
            "unet": unet.state_dict(), "text_encoder": text.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed(), "lr": lr,
            "chunk": chunk_idx, "pos": pos, "perm": perm, "rng": rng_state(device),
            "log": log_rows, "loss_smooth": loss_smooth, "model_config": cfg, "seed": args.seed,
            "chunk_size": args.chunk_size, "part_size": args.part_size, "batch_size": B, "zero_snr": args.zero_snr,
            "probe": probe_rows, "best_score": best_score,
            "args": vars(args) | {"out": str(out)},
        }
        save_checkpoint(out, st, log_rows)
        export_model(out, ema, export_dtype, meta(), log_rows, args.zero_snr)
        if probe_rows:
            write_csv(out / "model" / "probe.csv", PROBE_HEADER, probe_rows)
        if args.package is not None:
            write_package(args.package, ema, export_dtype, package_meta(), log_rows)

    captions_probe = probe_captions(args.probe_n) if args.probe_every_minutes > 0 else []
    captions_attr = probe_attribute_captions(args.probe_attribute_n) if args.probe_every_minutes > 0 else []

    def probe():
        """Sample, read, log; export the EMA weights to <out>/best/ when the score is the best so far."""
        nonlocal t_start, best_score
        t = time.monotonic()
        u, tx = ema.shadow
        imgs, attr_imgs, r = run_probe(u, tx, tokenizer, captions_probe, device, args.zero_snr, captions_attr)
        secs = time.monotonic() - t
        t_start += secs  # probe time is not training time
        score = probe_score(r)
        probe_rows.append([step, f"{elapsed() / 60:.2f}", step * B, f"{secs:.1f}", f"{score:.4f}"] +
                          [f"{r[k + sfx]:.4f}" for k in PROBE_KEYS for sfx in ("", "_lo", "_hi")] +
                          [int(r[k + "_n"]) for k in PROBE_KEYS])
        write_csv(out / "probe.csv", PROBE_HEADER, probe_rows)
        (out / "probe").mkdir(exist_ok=True)
        write_png(out / "probe" / f"step_{step:07d}.png", image_grid(imgs))
        if len(attr_imgs):
            write_png(out / "probe" / f"step_{step:07d}_attributes.png", image_grid(attr_imgs))
            (out / "probe" / "attribute_captions.txt").write_text("".join(f"{i}\t{c}\n" for i, c in enumerate(captions_attr)))
        (out / "probe" / "captions.txt").write_text("".join(f"{i}\t{c}\n" for i, c in enumerate(captions_probe)))
        best = score > best_score
        if best:
            best_score = score
            probe_meta = {k: v if isinstance(v, int) else (None if v == "nan" else float(v)) for k, v in zip(PROBE_HEADER, probe_rows[-1])}
            write_model_dir(out / "best", u, tx, export_dtype, meta() | {"probe": probe_meta},
                            log_rows, out / "tokenizer", args.zero_snr)
            write_csv(out / "best" / "probe.csv", PROBE_HEADER, probe_rows)
        msg = (f"probe @ step {step} ({elapsed() / 60:.1f} train min, {secs:.0f} s): object recall {r['object_recall']:.1%}, "
               f"background right {r['background_right']:.1%}, caption-exact {r['caption_exact']:.1%}, attribute drawn "
               f"{'/'.join(format(r['attribute_' + a], '.0%') for a in ('blurry', 'noisy', 'dark', 'striped'))} "
               f"(blurry/noisy/dark/striped), broken {r['broken_images']:.1%}, localization {r['object_localization']:.1%}, "
               f"removal {r['object_removal']:.1%}, named kept {r['object_named_kept']:.1%}"
               f"{' (best so far: exported to ' + str(out / 'best') + ')' if best else ''}")
        tqdm.write(msg) if args.progress == "bar" else print(msg, flush=True)

    def budget_left() -> bool:
        if args.steps is not None and step >= args.steps:
            return False
        if args.minutes and args.minutes > 0 and elapsed() >= 60 * args.minutes:
            return False
        return True

    loss_acc = torch.zeros((), device=device)
    n_acc = 0
    lr = lr_at(args, step, elapsed())
    last_save = time.monotonic()
    last_probe_min = (float(probe_rows[-1][1]) if probe_rows else 0.0)
    bar = tqdm(total=args.steps, initial=step, unit="it", dynamic_ncols=True, mininterval=1.0, smoothing=0.1,
               disable=args.progress == "lines")
    last_bar_step = step
    try:
        while budget_left():
            if pos + B > len(perm):
                chunk_idx += 1
                chunk_imgs, chunk_ids, chunk_text = load_chunk(chunk_idx)
                perm, pos = torch.randperm(len(chunk_imgs)), 0
                perm_dev = perm.to(device)
            idx = perm_dev[pos: pos + B]
            pos += B
            x0 = chunk_imgs[idx].float().div_(127.5).sub_(1.0)
            drop = torch.rand(B, device=device) < args.p_uncond
            noise = torch.randn_like(x0)
            if args.offset_noise:
                noise = noise + args.offset_noise * torch.randn(B, x0.shape[1], 1, 1, device=device)
            t = torch.randint(0, len(ac), (B,), device=device)
            a_t, s_t = sqrt_ac[t].view(B, 1, 1, 1), sqrt_1m_ac[t].view(B, 1, 1, 1)
            xt = a_t * x0 + s_t * noise
            target = a_t * noise - s_t * x0 if args.zero_snr else noise  # v or epsilon

            lr = lr_at(args, step, elapsed())
            for g in optimizer.param_groups:
                g["lr"] = lr
            with autocast:
                if chunk_text is None:
                    cond = text(torch.where(drop[:, None], empty_ids, chunk_ids[idx])).last_hidden_state
                else:  # each distinct caption of the chunk once; the gather sums their gradients
                    rows, inverse, empty_row = chunk_text
                    cond = text(rows).last_hidden_state[torch.where(drop, empty_row, inverse[idx])]
                pred = fwd_unet(xt, t, encoder_hidden_states=cond).sample
            if args.min_snr > 0:
                w = min_snr_weights(ac[t], args.min_snr, args.zero_snr)
                loss = (w * (pred.float() - target).pow(2).mean(dim=(1, 2, 3))).mean()
            else:
                loss = F.mse_loss(pred.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            ema.update(step)
            step += 1
            loss_acc += loss.detach()
            n_acc += 1

            done = not budget_left()
            if step % args.log_every == 0 or done:
                window = (loss_acc / n_acc).item()  # the one host sync, every log_every steps
                loss_acc.zero_()
                n_acc = 0
                loss_smooth = window if loss_smooth is None else 0.9 * loss_smooth + 0.1 * window
                log_rows.append([step, f"{loss_smooth:.6f}", f"{lr:.6g}", f"{elapsed():.1f}", f"{window:.6f}"])
                bar.update(step - last_bar_step)
                last_bar_step = step
                bar.set_postfix(loss=f"{loss_smooth:.4f}", lr=f"{lr:.2e}", min=f"{elapsed() / 60:.1f}")
                if args.progress == "lines":
                    el = elapsed()
                    print(f"step {step} | loss {loss_smooth:.4f} | lr {lr:.2e} | {el / 60:.2f} min | "
                          f"{step * B / max(el, 1e-9):.0f} img/s overall", flush=True)
                if not math.isfinite(window):
                    raise SystemExit(f"loss is {window} at step {step}; stopping (last checkpoint kept)")
            if not done and args.probe_every_minutes > 0 and elapsed() / 60 - last_probe_min >= args.probe_every_minutes:
                probe()
                last_probe_min = elapsed() / 60
                save()  # the probe's row is in the checkpoint: a resumed run never repeats or loses it
                last_save = time.monotonic()
            if not done and time.monotonic() - last_save >= 60 * args.save_every_minutes:
                save()
                last_save = time.monotonic()
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step} (SIGINT or SIGTERM); saving", flush=True)
    finally:
        bar.close()
        if source is not None:
            source.close()

    trained_s = elapsed()
    elapsed = lambda: trained_s  # noqa: E731  (training time is final: sampling below does not count)
    if args.probe_every_minutes > 0 and (not probe_rows or int(probe_rows[-1][0]) != step):
        probe()
    save()
    print(f"trained {step} steps in {trained_s / 60:.2f} min ({step / max(trained_s, 1e-9):.2f} it/s, "
          f"{step * B / max(trained_s, 1e-9):.0f} images/s overall; {step * B:,} images); "
          f"model exported to {out / 'model'}", flush=True)

    if args.sample > 0:
        from negstudy.shapes.world import sample_dataset

        _, captions, _ = sample_dataset(args.sample, seed=SAMPLE_SEED, **world_kwargs)
        captions = list(captions)
        u, tx = ema.shadow
        imgs = []
        for i in range(0, len(captions), 256):
            imgs.append(sample_images(u, tx, tokenizer, captions[i: i + 256], device, seed=args.seed + i,
                                      zero_snr=args.zero_snr))
        write_png(out / "samples.png", image_grid(torch.cat(imgs).numpy()))
        (out / "samples.txt").write_text("".join(f"{i}\t{c}\n" for i, c in enumerate(captions)))
        print(f"wrote {out / 'samples.png'} ({len(captions)} samples; captions in samples.txt, row-major)", flush=True)
        if args.package is not None:
            shutil.copy(out / "samples.png", args.package / "samples.png")
            with atomic_path(args.package / "meta.json") as tmp:
                tmp.write_text(json.dumps(package_meta({"sample_captions": captions}), indent=1) + "\n")


if __name__ == "__main__":
    main()
