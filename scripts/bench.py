"""negstudy's benchmark, every figure measured in one run of this script.

    python scripts/bench.py [--models shapes[,sd2,sdxl,sd2arch]] [--steps N] [--device auto] [--repeats 3] [--compile] [--quick] [--out bench.json]
    python scripts/bench.py --models sd2,sdxl --device cuda --out gpu.json   # the GPU figures (scripts/gpu_figures.sh)
    python scripts/bench.py --report a.json b.json                           # the tables of saved runs, merged

For each model:

1. step sweep: a delayed negative from EVERY start step (``from_step`` k = 0..n_calls), one pair
   and seed, on the shared-prefix engine (one ``generate`` call) against each schedule run alone:
   UNet batch rows evaluated, wall time, and the max |pixel difference| between the two; with the
   sampler's fixed rows and, where it uses them, without (a lone image's 2 rows padded to a block
   of 8 make the independent runs slower, which flatters the shared engine);
2. the sampler against diffusers' ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL),
   schedule ``always``, same model, prompt and seed, one image: wall-time ratio (target <= 1.05) after
   a warm-up, median of ``--repeats`` interleaved runs, and the max |pixel difference|; with the
   sampler's fixed rows off (diffusers' own batching: the engine's overhead) and, where the sampler
   uses them (the CPU), on;
3. cross-attention recording (``AttentionRecorder``, paper layers, word maps kept) on against off
   on a batch of seeds: wall-time ratio (target <= 1.3) and recorded bytes per image;
4. the price of batch-size-independent images: fixed rows (``NegativeSampler.fixed_rows``) on
   against off on one batch of ``--batch`` images;
5. rows per second under each speed option (:data:`OPTIONS`: fixed-row block sizes, channels_last,
   bf16 autocast; torch.compile with ``--compile``) on one batch, as ratios to the default measured
   in the same run (wall and CPU time), with the pixel difference from the default's images and
   whether each option's images are still batch-size independent; and the critical-step study's
   UNet rows per (pair, seed) before and after branching from the screened trajectories.

For ``sd2`` and ``sdxl`` (the real models' configurations with random weights: no weights are needed to
time them), in this order so that a run cut short keeps the most useful figures: 2, 3, then

6. the largest batch that fits: ``always`` images, doubling from 1 to the first CUDA out-of-memory
   (or a kernel's size limit), saying whether the UNet or the VAE's decoding hit it (skipped on a CPU);
7. throughput at that batch: UNet rows per second, seconds per VAE decode, images per second at the
   paper's 31 calls;
8. PROJECTIONS from 3 and 7 of the GPU time of the paper's strength-ratio study (20 pairs x 10 seeds x
   31 calls, 3 branches, attention recorded) and of its whole removal benchmark (5 prompt sets x 80
   captions x 5 seeds = 2000 originals, 8638 objects, from-0 (attention recorded) + fixed window +
   adaptive window, with the UNet-row accounting of negstudy.studies.removal: the window and the
   adaptive tries continue kept trajectories), judge calls excluded but counted, and the goal check
   (under one GPU-hour, or what limits it);
9. step sweep (1) at ``--sweep-steps`` (SDXL: 10 on a GPU, as its 31 independent 30-step runs alone
   would take minutes). 4 and 5 only with ``--options on``.

The default (the shapes model only) takes a few minutes on a 2-core CPU. ``sd2`` / ``sdxl`` are for
a GPU (512 / 1024 px, fp16, the real text encoders); ``--quick`` on a CPU runs the same code as a dry
run at 64 px with 1-layer text encoders and ~1/10 of the channels (``--narrow``): seconds, and its
numbers say nothing about a GPU (the output says so).

Everything but the "off" runs uses the sampler as ``--fixed-rows`` sets it (default: the
sampler's own choice: on a CPU 8 rows for the shapes model, 2 for SD2's UNet; off on a GPU).

Models: ``shapes`` (the shipped 32 px pixel-space model), ``sd2`` (Stable Diffusion 2 base: UNet,
VAE and 23-layer OpenCLIP text encoder at their real configurations, random weights, 512 px),
``sdxl`` (SDXL base 1.0: UNet, VAE, CLIP-L and OpenCLIP-bigG text encoders, 1024 px), ``sd2arch``
(SD2's UNet and VAE at 256 px with a 1-layer text encoder), ``tiny`` (negstudy.tiny), or a diffusers
directory. Prints the machine, Markdown tables for the README and one JSON line; ``--out`` also writes
the JSON (after every part).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from negstudy.attention import AttentionRecorder
from negstudy.models import load_pipeline, pick_device
from negstudy.sampler import Batch, NegativeSampler, cpu_fixed_rows
from negstudy.schedules import Always, FromStep

PROMPT, NEGATIVE, SEED = "a ball on the grass", "sun", 3
PROMPTS = ["a box in the sky", "a tree on the sand", "a kite at night"]  # batches: PROMPT + these
# Stable Diffusion 2 base (stabilityai/stable-diffusion-2-base), unet/config.json and vae/config.json
SD2_UNET = dict(
    act_fn="silu", attention_head_dim=(5, 10, 20, 20), block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False, cross_attention_dim=1024,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, num_class_embeds=None,
    only_cross_attention=False, out_channels=4, sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True, upcast_attention=False,
)
SD2_VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    scaling_factor=0.18215, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                    set_alpha_to_one=False, steps_offset=1)
# its text_encoder/config.json (OpenCLIP ViT-H/14's text tower, the penultimate layer kept: 23 layers)
SD2_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                max_position_embeddings=77, hidden_act="gelu", projection_dim=512, layer_norm_eps=1e-5)
# Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0): unet/, vae/, text_encoder/ (CLIP ViT-L/14),
# text_encoder_2/ (OpenCLIP ViT-bigG/14, with projection) and scheduler/ configs
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280), center_input_sample=False,
    cross_attention_dim=2048, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, only_cross_attention=False,
    out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=(1, 2, 10),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
)
SDXL_VAE = SD2_VAE | dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5)
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)
# name -> (native pixel size, text encoder layers, what it is)
REAL = {"sd2": (512, (23,), "Stable Diffusion 2 base"), "sdxl": (1024, (12, 32), "Stable Diffusion XL base 1.0")}


def narrow(name: str) -> dict:
    """Config overrides of ``--narrow`` (CPU dry runs): the same layout (block types, layers per block,
    transformer depths, linear projections, SDXL's text_time embedding and two encoders) with about 1/10
    of the channels, so a CPU runs every code path in seconds. unet, vae, text(, text_2) -> overrides."""
    vae = dict(block_out_channels=(32, 64, 128, 128))
    if name == "sd2":
        return dict(unet=dict(block_out_channels=(32, 64, 128, 128), attention_head_dim=(1, 2, 4, 4), cross_attention_dim=128),
                    vae=vae, text=dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, projection_dim=64))
    return dict(unet=dict(block_out_channels=(32, 64, 128), attention_head_dim=(1, 2, 4), cross_attention_dim=96 + 160,
                          addition_time_embed_dim=32, projection_class_embeddings_input_dim=6 * 32 + 160),
                vae=vae, text=dict(hidden_size=96, intermediate_size=384, num_attention_heads=2, projection_dim=96),
                text_2=dict(hidden_size=160, intermediate_size=640, num_attention_heads=2, projection_dim=160))
TARGET_DIFFUSERS, TARGET_ATTENTION = 1.05, 1.3


# ----------------------------------------------------------------------------- models


def real_pipeline(name: str, device: torch.device, dtype: torch.dtype, size: int | None = None,
                  text_layers: int | None = None, seed: int = 0, narrowed: bool = False):
    """SD2 base's or SDXL base's UNet, VAE and text encoder(s) at their real configurations, random weights.

    size: image side in pixels (default the model's native 512 / 1024); text_layers: layers of each text
    encoder (default the real 23 / 12 and 32). The tokenizers are negstudy's small word-level CLIP
    tokenizers (the embedding tables keep CLIP's 49408 rows). Built on ``device`` directly (random init on
    a GPU takes seconds), then cast to ``dtype``. narrowed: :func:`narrow`'s channels (CPU dry runs).
    """
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from negstudy.tiny import TINY_WORDS
    from negstudy.tokenizer import build_clip_tokenizer

    native, layers, _ = REAL[name]
    size = size or native
    if size % 64:
        raise ValueError(f"size={size}: must be a multiple of 64 (the latents pass 3 downsamplings)")
    words = sorted({*TINY_WORDS, *" ".join([PROMPT, NEGATIVE, *PROMPTS]).split()})
    tokenizer = build_clip_tokenizer(words)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    def text(cls, config, n_layers):
        return cls(CLIPTextConfig(**config | ids | ({"num_hidden_layers": n_layers} if n_layers else {}))).eval()

    o = narrow(name) if narrowed else {}
    torch.manual_seed(seed)
    with torch.device(device):
        if name == "sd2":
            unet = UNet2DConditionModel(**SD2_UNET | {"sample_size": size // 8} | o.get("unet", {})).eval()
            vae = AutoencoderKL(**SD2_VAE | {"sample_size": size} | o.get("vae", {})).eval()
            encoder = text(CLIPTextModel, SD2_TEXT | o.get("text", {}), text_layers)
        else:
            unet = UNet2DConditionModel(**SDXL_UNET | {"sample_size": size // 8} | o.get("unet", {})).eval()
            vae = AutoencoderKL(**SDXL_VAE | {"sample_size": size} | o.get("vae", {})).eval()
            encoder = text(CLIPTextModel, SDXL_TEXT | o.get("text", {}), text_layers)
            encoder_2 = text(CLIPTextModelWithProjection, SDXL_TEXT_2 | o.get("text_2", {}), text_layers)
    if name == "sd2":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=PNDMScheduler(**SD_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    else:
        tokenizer_2 = build_clip_tokenizer(words)
        tokenizer_2.pad_token = "!"  # SDXL's tokenizer_2 pads with "!"
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoder, text_encoder_2=encoder_2, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer_2, unet=unet,
                                         scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(device, dtype)


def sd2_arch_pipeline(device: torch.device, dtype: torch.dtype, size: int = 256, text_layers: int = 1, seed: int = 0):
    """``sd2arch``: :func:`real_pipeline` ("sd2") at 256 px with a 1-layer text encoder."""
    return real_pipeline("sd2", device, dtype, size, text_layers, seed)


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def load_model(name: str, device: torch.device, size: int | None = None, text_layers: int | None = None,
               narrowed: bool = False):
    """(pipeline, description) of a model named on the command line."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if name in REAL:
        native, layers, what = REAL[name]
        pipe = real_pipeline(name, device, dtype, size, text_layers, narrowed=narrowed)
        px = size or native
        te = [pipe.text_encoder] + ([pipe.text_encoder_2] if name == "sdxl" else [])
        counts = ", ".join(f"{parameters(m) / 1e6:.1f} M" for m in te)
        n_layers = "/".join(str(m.config.num_hidden_layers) for m in te)
        return pipe, (f"{what} {'layout NARROWED (~1/10 of the channels; a dry run)' if narrowed else 'configurations'}, "
                      f"random weights, {px} px ({px // 8}x{px // 8} latents"
                      + ("" if px == native else f"; native {native} px") + f"), {dtype}; UNet "
                      f"{parameters(pipe.unet) / 1e6:.1f} M parameters, VAE {parameters(pipe.vae) / 1e6:.1f} M, "
                      f"text encoder(s) {counts} ({n_layers} layers"
                      + ("" if text_layers is None else "; real: " + "/".join(map(str, layers))) + ")")
    if name == "sd2arch":
        return sd2_arch_pipeline(device, dtype, size or 256, text_layers or 1), (
            f"SD2-base architecture, random weights, {size or 256} px; random CLIP text encoder of width 1024 "
            f"with {text_layers or 1} layer(s) (SD2: 23)")
    if name == "tiny":
        from negstudy.tiny import tiny_pipeline

        pipe = tiny_pipeline(0).to(device)
        return (pipe if dtype == torch.float32 else pipe.to(device, dtype)), "negstudy.tiny random model (16x16 latents)"
    from omegaconf import OmegaConf  # here: the GPU machine's python has no omegaconf / hydra, and sd2 / sdxl need neither

    from negstudy.config import ModelConfig

    path = "builtin:shapes" if name == "shapes" else name
    pipe = load_pipeline(OmegaConf.structured(ModelConfig(name=Path(name).name, path=path)), device)
    px = pipe.unet.config.sample_size * (pipe.vae_scale_factor if pipe.vae is not None else 1)
    return pipe, f"{'shipped shapes model' if name == 'shapes' else path}, {px} px"


def defaults(name: str, device: torch.device, quick: bool) -> dict:
    """Sizes of a model's measurements when the command line gives none.

    steps (the diffusers and attention comparisons), images (attention), batch (fixed rows); for sd2 and
    sdxl also sweep_steps (the shared-prefix sweep: SDXL's independent runs at 30 steps would take minutes),
    cap (largest-batch search), throughput_steps, size / text_layers / narrowed (None: the real ones).
    """
    if name in REAL:
        if device.type == "cuda" and not quick:  # the GPU run: the paper's 30 steps
            return dict(steps=30, images=4 if name == "sd2" else 2, batch=16, sweep_steps=30 if name == "sd2" else 10,
                        cap=256 if name == "sd2" else 64, throughput_steps=5, size=None, text_layers=None, narrowed=False)
        if quick:  # a dry run of the same code: 64 px, 1-layer text encoders, ~1/10 of the channels
            return dict(steps=2, images=2, batch=2, sweep_steps=2, cap=8, throughput_steps=2, size=64, text_layers=1,
                        narrowed=device.type == "cpu")
        return dict(steps=3, images=2, batch=2, sweep_steps=3, cap=8, throughput_steps=2, size=None, text_layers=None,
                    narrowed=False)  # a patient CPU at the real size: minutes per image
    if name == "sd2arch" and device.type == "cpu":  # seconds per UNet row: a few steps, small batches
        d = dict(steps=3, images=2, batch=4)
    else:
        d = dict(steps=20, images=4, batch=16)  # 20: the default run stays within a few minutes on 2 cores
    return dict(steps=min(d["steps"], 10), images=2, batch=4) if quick else d


# ----------------------------------------------------------------------------- measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


@contextlib.contextmanager
def count_rows(unet):
    """Rows of every UNet call made inside the block, in a list."""
    rows = []
    handle = unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        yield rows
    finally:
        handle.remove()


def step_sweep(sampler: NegativeSampler, device) -> dict:
    """from_step k for every k = 0..n_calls: shared-prefix engine against independent runs."""
    n = sampler.n_calls
    plans = [FromStep(k).plan(n) for k in range(n + 1)]
    m = len(plans)
    one = lambda plan: Batch([PROMPT], [NEGATIVE], [SEED], [plan])
    sampler.generate(one(plans[0]))  # warm-up
    with count_rows(sampler.unet) as rows:
        shared, t_shared = timed(lambda: sampler.generate(Batch([PROMPT] * m, [NEGATIVE] * m, [SEED] * m, plans)), device)
    r_shared = sum(rows)
    with count_rows(sampler.unet) as rows:
        alone, t_alone = timed(lambda: np.concatenate([sampler.generate(one(p)) for p in plans]), device)
    r_alone = sum(rows)
    return dict(schedules=m, rows_shared=r_shared, rows_independent=r_alone, rows_ratio=r_shared / r_alone,
                wall_shared_s=t_shared, wall_independent_s=t_alone, wall_ratio=t_shared / t_alone,
                max_pixel_diff=float(np.abs(shared - alone).max()))


def versus_diffusers(samplers: dict[str, NegativeSampler], repeats: int, device) -> dict:
    """Schedule ``always`` on one image: each sampler against StableDiffusionPipeline.__call__, interleaved."""
    first = next(iter(samplers.values()))
    pipe = first.pipe
    latent = pipe.vae is None  # pixel-space: the UNet sample is the image

    def reference():
        # both at the model's native size (diffusers counts a pixel-space model's size in VAE units)
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=first.steps, guidance_scale=first.guidance_scale,
                   generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent" if latent else "np").images
        return pipe.image_processor.postprocess(out, output_type="np") if latent else out

    batch = Batch([PROMPT], [NEGATIVE], [SEED], [Always().plan(first.n_calls)])
    ref = reference()  # warm-up
    ours = {name: s.generate(batch) for name, s in samplers.items()}
    times: dict[str, list[float]] = {name: [] for name in [*samplers, "diffusers"]}
    for _ in range(repeats):
        for name, s in samplers.items():
            times[name].append(timed(lambda s=s: s.generate(batch), device)[1])
        times["diffusers"].append(timed(reference, device)[1])
    t_ref = statistics.median(times["diffusers"])
    out = dict(wall_diffusers_s=t_ref, target=TARGET_DIFFUSERS, repeats=repeats)
    for name, s in samplers.items():
        t = statistics.median(times[name])
        out[name] = dict(fixed_rows=s.fixed_rows, wall_sampler_s=t, wall_ratio=t / t_ref,
                         max_pixel_diff=float(np.abs(ours[name] - ref).max()), finite=bool(np.isfinite(ours[name]).all()))
    return out


def attention_cost(sampler: NegativeSampler, repeats: int, images: int, device) -> dict:
    """Recording on against off, schedule ``always`` on ``images`` seeds; recorded bytes per image."""
    plan = Always().plan(sampler.n_calls)
    batch = Batch([PROMPT] * images, [NEGATIVE] * images, list(range(images)), [plan] * images)
    recorder = AttentionRecorder(sampler.unet)  # installs itself for each generate call, as the studies use it
    off, on = sampler.generate(batch), sampler.generate(batch, [recorder])  # warm-up
    t_off, t_on = [], []
    for _ in range(repeats):
        t_off.append(timed(lambda: sampler.generate(batch), device)[1])
        t_on.append(timed(lambda: sampler.generate(batch, [recorder]), device)[1])
    a, b = statistics.median(t_on), statistics.median(t_off)
    return dict(images=images, layers=len(recorder.layers), wall_on_s=a, wall_off_s=b, wall_ratio=a / b,
                target=TARGET_ATTENTION, bytes_per_image=recorder.nbytes() / images,
                same_pixels=bool(np.array_equal(on, off)), repeats=repeats)


OPTIONS = {  # name -> sampler settings and UNet memory format; the first is the reference
    "fixed rows (default)": dict(),
    "fixed rows off": dict(fixed_rows=0),
    "fixed rows 16": dict(fixed_rows=16),
    "fixed rows 32": dict(fixed_rows=32),
    "channels_last": dict(channels_last=True),
    "bf16 autocast": dict(autocast="bf16"),
    "bf16 autocast, fixed rows 16": dict(autocast="bf16", fixed_rows=16),
}


QUICK_SKIPS = ("bf16 autocast, fixed rows 16",)  # --quick on a CPU: bf16 runs ~2-5 rows/s there; one bf16 option shows the code path


def options(pipe, steps: int, images: int, repeats: int, device, compile_unet: bool = False, skip=()) -> dict:
    """Rows per second of the sampler under each speed option (but those named in ``skip``), on one batch of
    ``images`` seeds (``always``).

    Interleaved repeats, medians of wall and process CPU time (CPU time is steadier on a shared
    machine); ratios against the first option measured in the same run; max |pixel difference|
    from its images; whether the images are byte-identical to the same option's images generated
    one by one (batch-size independence).
    """
    opts = {k: v for k, v in OPTIONS.items() if k not in skip}
    if compile_unet:
        opts["torch.compile (inductor)"] = dict(compile=True)
    prompts = [PROMPT, *PROMPTS]
    batch_of = lambda n: Batch([prompts[i % 4] for i in range(n)], [NEGATIVE] * n, list(range(n)), [Always().plan(n_calls)] * n)
    unet = pipe.unet
    samplers, out = {}, {}
    for name, o in opts.items():
        kw = {k: v for k, v in o.items() if k in ("fixed_rows", "autocast")}
        samplers[name] = NegativeSampler(pipe, steps=steps, **kw)
    n_calls = next(iter(samplers.values())).n_calls
    batch = batch_of(images)
    rows = 2 * images * n_calls

    @contextlib.contextmanager
    def setup(o):
        original = pipe.unet
        if o.get("channels_last"):
            unet.to(memory_format=torch.channels_last)
        if o.get("compile"):
            pipe.unet = torch.compile(unet)
        try:
            yield
        finally:
            pipe.unet = original
            unet.to(memory_format=torch.contiguous_format)

    times = {name: [] for name in opts}
    for name, o in opts.items():  # warm-up (compilation), reference images, one-by-one images
        with setup(o):
            sampler = samplers[name]
            sampler.unet = pipe.unet
            t = time.perf_counter()
            imgs = sampler.generate(batch)
            warm = time.perf_counter() - t
            alone = np.concatenate([sampler.generate(batch_of(1)) for _ in range(1)])
            out[name] = dict(images=imgs, warmup_s=warm, batch_independent=bool(np.array_equal(alone[0], imgs[0])))
    for _ in range(repeats):
        for name, o in opts.items():
            with setup(o):
                samplers[name].unet = pipe.unet
                c = time.process_time()
                _, w = timed(lambda: samplers[name].generate(batch), device)
                times[name].append((w, time.process_time() - c))
    ref = next(iter(opts))
    result = {}
    for name in opts:
        w = statistics.median(t for t, _ in times[name])
        c = statistics.median(t for _, t in times[name])
        result[name] = dict(rows=rows, wall_s=w, cpu_s=c, rows_per_s=rows / w, rows_per_cpu_s=rows / c,
                            max_pixel_diff=float(np.abs(out[name]["images"] - out[ref]["images"]).max()),
                            batch_independent=out[name]["batch_independent"], warmup_s=out[name]["warmup_s"])
    for name in opts:
        result[name]["ratio"] = result[name]["rows_per_s"] / result[ref]["rows_per_s"]
        result[name]["ratio_cpu"] = result[name]["rows_per_cpu_s"] / result[ref]["rows_per_cpu_s"]
    return dict(images=images, steps=steps, repeats=repeats, options=result)


def largest_batch(pipe, device, cap: int, probe_steps: int = 2, on_cpu: bool = False) -> dict:
    """The largest batch of ``always`` images (2 UNet rows each) that one ``generate`` fits, doubling from 1.

    Each probe is a short run (``probe_steps``) of the sampler as the studies use it on a GPU (whole
    batches, the VAE decoding the batch at once); the first CUDA out-of-memory stops the search and
    says where it struck (UNet or VAE decoding). Skipped on a CPU (no memory wall to find) unless ``on_cpu``
    (a dry run of the search: it doubles up to ``cap``).
    """
    cuda = device.type == "cuda"
    if not cuda and not on_cpu:
        return dict(skipped=f"{device.type}: no out-of-memory wall to find (CUDA only; --max-batch N runs the search)",
                    batch=None)
    sampler = NegativeSampler(pipe, steps=probe_steps, fixed_rows=0)
    phase = {"where": "unet"}
    decode = sampler.decode

    def watched(latents):
        phase["where"] = "vae decode"
        return decode(latents)

    sampler.decode = watched
    fits, peaks, limit, b = None, {}, None, 1
    while b <= cap:
        phase["where"] = "unet"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        failed = None
        try:
            sampler.generate(Batch([PROMPT] * b, [NEGATIVE] * b, list(range(b)), [Always().plan(sampler.n_calls)] * b))
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError, or a kernel's size limit (cuDNN, INT_MAX elements)
            failed = f"{type(err).__name__}: " + (str(err).splitlines() or [""])[0][:200]
        if failed is not None:  # outside the except block: the failed call's tensors are freed first
            limit = dict(batch=b, where=phase["where"], error=failed)
            if cuda:
                torch.cuda.empty_cache()
            break
        if cuda:
            peaks[b] = torch.cuda.max_memory_allocated(device)
        fits, b = b, 2 * b
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    return dict(batch=fits, cap=cap, out_of_memory=limit, peak_bytes={str(k): v for k, v in peaks.items()},
                total_bytes=total, probe_steps=probe_steps,
                note=None if limit else f"no out-of-memory up to the cap of {cap} images")


def throughput(pipe, device, batch: int, steps: int, paper_calls: int = 31) -> dict:
    """Rows per second of the UNet and seconds per VAE decode at ``batch`` images; images per second at
    ``paper_calls`` UNet calls (the paper's 30 PNDM steps), from one warm-up and one timed ``generate``
    (``steps``) and one timed decode of the same batch."""
    sampler = NegativeSampler(pipe, steps=steps, fixed_rows=0)
    plan = Always().plan(sampler.n_calls)
    batch_of = Batch([([PROMPT, *PROMPTS])[i % 4] for i in range(batch)], [NEGATIVE] * batch, list(range(batch)), [plan] * batch)
    sampler.generate(batch_of)  # warm-up (kernels, allocator, text encodings); the caller halves the batch on OOM
    with count_rows(sampler.unet) as rows:
        _, t_gen = timed(lambda: sampler.generate(batch_of), device)
    latents = sampler.initial_latents(list(range(batch))) / sampler.scheduler.init_noise_sigma
    with torch.no_grad():
        sampler.decode(latents)  # warm-up of the decoder at this batch
        _, t_dec = timed(lambda: sampler.decode(latents), device)
    t_unet = max(t_gen - t_dec, 1e-9)
    rows_per_s = sum(rows) / t_unet
    per_image = (2 * paper_calls / rows_per_s) + t_dec / batch
    return dict(batch=batch, steps=steps, n_calls=sampler.n_calls, rows=sum(rows), wall_generate_s=t_gen, wall_decode_s=t_dec,
                rows_per_s=rows_per_s, decode_s_per_image=t_dec / batch, paper_calls=paper_calls,
                images_per_s_paper=1 / per_image)


# The paper's workloads (PAPER.md sections 3 and 6) and negstudy's removal settings (negstudy.config's
# removal defaults, the UNet-row accounting of negstudy.studies.removal)
PAPER = dict(calls=31, ratio_pairs=20, ratio_seeds=10, prompt_sets=5, captions=80, seeds_per_caption=5,
             objects=3154 + 1706 + 877 + 1788 + 1113,  # the paper's table: objects per prompt set
             window=(5, 15), critical_step=6, length=5, extend=5, max_regenerations=4,
             try_success=0.55)  # a try removes the object with about the paper's windowed rate (49.8-61.4 %)


def removal_workload(p: dict = PAPER) -> dict:
    """UNet rows, VAE decodes and judge calls of the paper's whole removal benchmark, by method; the adaptive
    window's tries at best (1 try each), expected (each try succeeds with ``try_success``) and worst (all)."""
    n, originals, objects = p["calls"], p["prompt_sets"] * p["captions"] * p["seeds_per_caption"], p["objects"]
    k = p["critical_step"]
    ends = sorted({min(n - 1, k + p["length"] - 1 + p["extend"] * j) for j in range(p["max_regenerations"] + 1)})
    tries = [2 * (n - k)] + [2 * (n - (e + 1)) for e in ends[:-1]]  # try j continues the negative's trunk after e_{j-1}
    reach = [(1 - p["try_success"]) ** j for j in range(len(tries))]
    adaptive = {"best": tries[0], "expected": sum(r * q for r, q in zip(tries, reach)), "worst": sum(tries)}
    n_tries = {"best": 1, "expected": sum(reach), "worst": len(tries)}
    rows = {"originals": 2 * n * originals, "from0": 2 * n * objects, "window": 2 * (n - p["window"][0]) * objects}
    out = {}
    for case in ("best", "expected", "worst"):
        r = rows | {"adaptive": adaptive[case] * objects}
        fresh = rows | {"window": 2 * n * objects, "adaptive": 2 * n * n_tries[case] * objects}  # every image from x_T
        out[case] = dict(rows=r, rows_total=sum(r.values()), rows_without_prefix_reuse=sum(fresh.values()),
                         decodes=originals + objects * (2 + n_tries[case]),
                         judge_calls=originals + objects * (2 + n_tries[case]), adaptive_tries_per_object=n_tries[case])
    return dict(originals=originals, objects=objects, calls=n, adaptive_rows_per_try=tries, cases=out)


def projections(entry: dict, p: dict = PAPER) -> dict | None:
    """GPU seconds of the paper's strength-ratio study and whole removal benchmark from one model's figures:
    UNet rows / rows per second at the largest batch, x the attention recording's wall ratio on the rows that
    record, plus VAE decodes x seconds per decoded image; judge calls excluded (counted)."""
    thr, att = entry.get("throughput"), entry.get("attention")
    if not thr:
        return None
    rps, dec, att_ratio = thr["rows_per_s"], thr["decode_s_per_image"], (att or {}).get("wall_ratio", 1.0)
    images = p["ratio_pairs"] * p["ratio_seeds"]
    rows = images * p["calls"] * 3  # three branches at every step
    ratio_s = rows / rps * att_ratio + images * dec
    work = removal_workload(p)
    removal = {}
    for case, w in work["cases"].items():
        unet = {m: r / rps * (att_ratio if m == "from0" else 1.0) for m, r in w["rows"].items()}  # from-0 records attention
        decode = w["decodes"] * dec
        total = sum(unet.values()) + decode
        removal[case] = dict(seconds=total, unet_s=unet, decode_s=decode, judge_calls=w["judge_calls"],
                             rows=w["rows_total"], rows_without_prefix_reuse=w["rows_without_prefix_reuse"],
                             seconds_without_prefix_reuse=w["rows_without_prefix_reuse"] / rps + decode,
                             rows_per_s_for_one_hour=w["rows_total"] / max(3600 - decode, 1e-9))
    return dict(rows_per_s=rps, batch=thr["batch"], decode_s_per_image=dec, attention_ratio=att_ratio,
                strength_ratio=dict(images=images, rows=rows, seconds=ratio_s, attention_bytes=images * (att or {}).get(
                    "bytes_per_image_paper", (att or {}).get("bytes_per_image", 0))),
                removal=removal, workload=work)


def goal_check(name: str, proj: dict, device) -> str:
    """One sentence: the removal benchmark under one GPU-hour or what limits it."""
    e = proj["removal"]["expected"]
    hours, share = e["seconds"] / 3600, {m: s / e["seconds"] for m, s in e["unet_s"].items()}
    top = max(share, key=share.get)
    head = (f"{name}: removal benchmark {hours:.2f} h (expected tries; best {proj['removal']['best']['seconds'] / 3600:.2f} h, "
            f"worst {proj['removal']['worst']['seconds'] / 3600:.2f} h) at {proj['rows_per_s']:.0f} UNet rows/s "
            f"(batch {proj['batch']}) + {proj['decode_s_per_image'] * 1e3:.0f} ms per VAE decode")
    if device.type != "cuda":
        return head + ": NOT a GPU figure (this is a CPU dry run; the numbers say nothing about the goal)"
    if hours <= 1:
        return head + f": UNDER one GPU-hour ({e['judge_calls']:,} judge calls excluded)"
    return (head + f": OVER one GPU-hour; UNet rows take {sum(share.values()):.0%} ({top} the largest share, {share[top]:.0%}), "
            f"VAE decodes {e['decode_s'] / e['seconds']:.0%}; one hour needs {e['rows_per_s_for_one_hour']:.0f} rows/s")


def prefix_reuse_rows(n_calls: int, stride: int) -> dict:
    """UNet rows of one (pair, seed) of the critical-step study: shared-prefix sweep vs branching from the screen."""
    starts = list(range(0, n_calls, stride))
    screen = 2 * n_calls
    shared = 2 * n_calls + sum(2 * (n_calls - k) for k in starts)  # the never lane + one lane per start after it splits
    branched = sum(2 * (n_calls - k) for k in starts)  # the prefix and the plain image come from the screen
    return dict(stride=stride, starts=len(starts) + 1, screen=screen, sweep_shared_prefix=shared, sweep_branched=branched,
                total_before=screen + shared, total_after=screen + branched, ratio=(screen + branched) / (screen + shared))


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                device=str(device), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                load_average_start=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    import diffusers

    info["diffusers"] = diffusers.__version__
    return info


# ----------------------------------------------------------------------------- report


def _ratio(a: float, b: float, r: float) -> str:
    return f"{a:.2f} s / {b:.2f} s = {r:.3f}"


def markdown(results: dict) -> str:
    """Rows: measurements; columns: models."""
    models, n = results["models"], results["repeats"]
    head = " | ".join(f"{name} ({m['steps']} steps, {m['n_calls']} UNet calls)" for name, m in models.items())
    lines = [f"| | {head} |", "|---|" + "---|" * len(models)]

    def cell(fmt, m):
        try:
            return fmt(m)
        except (KeyError, TypeError):  # a part this model skipped or did not reach
            return "-"

    def row(label, fmt):
        cells = [cell(fmt, m) for m in models.values()]
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("model", lambda m: m["short"] + (" (NARROWED dry run)" if "NARROWED" in m["about"] else ""))

    row("fixed rows (batch-size-independent images)", lambda m: str(m["fixed_rows_used"] or "off"))
    row("from_step sweep: schedules (k = 0..n_calls)", lambda m: str(m["sweep"]["schedules"]))
    row("UNet rows: shared prefix / independent",
        lambda m: f"{m['sweep']['rows_shared']} / {m['sweep']['rows_independent']} = {m['sweep']['rows_ratio']:.3f}")
    for key, what in (("sweep", "as set"), ("sweep_off", "fixed rows off")):
        if not any(key in m for m in models.values()):
            continue
        row(f"wall: shared prefix / independent ({what})",
            lambda m, k=key: _ratio(m[k]["wall_shared_s"], m[k]["wall_independent_s"], m[k]["wall_ratio"]) if k in m else "-")
        row(f"max abs pixel difference, shared vs independent ({what})",
            lambda m, k=key: f"{m[k]['max_pixel_diff']:.1e}" if k in m else "-")
    for key in ("off", "on"):
        if not any(key in m.get("diffusers", {}) for m in models.values()):
            continue

        def versus(m, k=key):
            d = m["diffusers"].get(k)
            return _ratio(d["wall_sampler_s"], m["diffusers"]["wall_diffusers_s"], d["wall_ratio"]) if d else "-"

        row(f"wall: sampler (fixed rows {key}) / diffusers, `always`, 1 image (median of {n}; target <= {TARGET_DIFFUSERS})",
            versus)
        row(f"max abs pixel difference, sampler (fixed rows {key}) vs diffusers",
            lambda m, k=key: f"{m['diffusers'][k]['max_pixel_diff']:.1e}" if k in m["diffusers"] else "-")
    row(f"wall: attention recording on / off (median of {n}; target <= {TARGET_ATTENTION})",
        lambda m: _ratio(m["attention"]["wall_on_s"], m["attention"]["wall_off_s"], m["attention"]["wall_ratio"])
        + f" ({m['attention']['images']} images)")
    row("recorded attention data per image", lambda m: _bytes(m["attention"]["bytes_per_image"])
        + f" ({m['attention']['layers']} layers, {m['n_calls']} calls)")
    row("largest batch that fits (images, `always`; doubling to the first CUDA out-of-memory)", _largest)
    row("throughput at that batch: UNet rows/s; VAE decode per image; images/s at 31 calls",
        lambda m: (f"{m['throughput']['rows_per_s']:.1f} rows/s; {m['throughput']['decode_s_per_image'] * 1e3:.0f} ms; "
                   f"{m['throughput']['images_per_s_paper']:.2f} images/s (batch {m['throughput']['batch']}, "
                   f"{m['throughput']['n_calls']}-call run)"))
    row("sweep measured at", lambda m: f"{m['sweep']['steps']} steps" if "steps" in m["sweep"] else "-")
    names = list(dict.fromkeys(k for m in models.values() for k in m.get("options", {}).get("options", {})))
    for name in names:
        def opt(m, name=name):
            o = m["options"]["options"].get(name)
            if o is None:
                return "-"
            return (f"{o['rows_per_s']:.0f} rows/s (x{o['ratio']:.2f}; CPU time x{o['ratio_cpu']:.2f}); "
                    f"max pixel diff {o['max_pixel_diff']:.1e}; batch-independent {'yes' if o['batch_independent'] else 'NO'}")
        row(f"speed option: {name} (`always`, one batch, median of {n})", opt)
    row("critical-step study, UNet rows per (pair, seed) at 30 steps, stride 3: screen + sweep, shared prefix -> branched",
        lambda m: f"{m['prefix_reuse']['total_before']} -> {m['prefix_reuse']['total_after']} (x{m['prefix_reuse']['ratio']:.2f})")
    row(f"wall: fixed rows on / off, `always`, one batch (median of {n})",
        lambda m: _ratio(m["fixed_rows"]["wall_on_s"], m["fixed_rows"]["wall_off_s"], m["fixed_rows"]["wall_ratio"])
        + f" ({m['fixed_rows']['images']} images, blocks of {m['fixed_rows']['fixed_rows']} rows)")
    return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _largest(m) -> str:
    c = m["capacity"]
    if c.get("skipped"):
        return f"skipped ({c['skipped']})"
    oom = c["out_of_memory"]
    peak = c["peak_bytes"].get(str(c["batch"]))
    return (f"{c['batch']} (peak {peak / 2**30:.1f} of {c['total_bytes'] / 2**30:.0f} GiB)" if peak else str(c["batch"])) + (
        f"; {'out of memory' if 'OutOfMemory' in oom['error'] else oom['error'][:80]} at {oom['batch']} in the {oom['where']}"
        if oom else f"; {c['note']}")


def projection_markdown(results: dict) -> str:
    """The paper's workloads on one such GPU, from each model's measured figures."""
    models = {k: m for k, m in results["models"].items() if m.get("projection")}
    if not models:
        return ""
    lines = ["| projection (one GPU, from the figures above) | " + " | ".join(models) + " |",
             "|---|" + "---|" * len(models)]

    def row(label, fmt):
        lines.append(f"| {label} | " + " | ".join(fmt(m["projection"]) for m in models.values()) + " |")

    def hours(x):
        return f"{x / 3600:.2f} h" if x >= 3600 else f"{x / 60:.1f} min"

    row("strength-ratio study: 20 pairs x 10 seeds x 31 calls x 3 branches, attention recorded",
        lambda p: f"{hours(p['strength_ratio']['seconds'])} ({p['strength_ratio']['rows']:,.0f} rows)")
    w = next(iter(models.values()))["projection"]["workload"]
    row(f"removal benchmark, {w['originals']:,} originals + {w['objects']:,} objects (from-0 + window + adaptive), "
        "expected tries", lambda p: f"{hours(p['removal']['expected']['seconds'])} ({p['removal']['expected']['rows']:,.0f} rows)")
    row("... best (1 adaptive try) / worst (5 tries)",
        lambda p: f"{hours(p['removal']['best']['seconds'])} / {hours(p['removal']['worst']['seconds'])}")
    row("... its share: originals / from-0 (attention) / window / adaptive / VAE decodes",
        lambda p: " / ".join(f"{v / p['removal']['expected']['seconds']:.0%}" for v in
                             [*(p['removal']['expected']['unet_s'][k] for k in ("originals", "from0", "window", "adaptive")),
                              p['removal']['expected']['decode_s']]))
    row("... without prefix reuse (every image from x_T)",
        lambda p: f"{hours(p['removal']['expected']['seconds_without_prefix_reuse'])} "
                  f"({p['removal']['expected']['rows_without_prefix_reuse']:,.0f} rows)")
    row("... at the largest batch's rows/s (the removal overlay's batch_size is 32 images: raise it to match)",
        lambda p: f"{p['rows_per_s']:.0f} rows/s at {p['batch']} images; {p['decode_s_per_image'] * 1e3:.0f} ms per decode")
    row("... judge calls (excluded from the time): best / expected / worst",
        lambda p: " / ".join(f"{p['removal'][c]['judge_calls']:,.0f}" for c in ("best", "expected", "worst")))
    return "\n".join(lines)


def report(results: dict) -> str:
    """The Markdown tables, the goal checks and a note when the figures are not a GPU's."""
    device = torch.device(results["machine"]["device"].split(":")[0])
    parts = [markdown(results), "", projection_markdown(results), ""]
    for name, m in results["models"].items():
        if m.get("projection"):
            parts.append("goal check: " + goal_check(name, m["projection"], device))
    if device.type != "cuda":
        parts.append(f"NOTE: measured on {device.type}, not a GPU: the times, ratios and projections above only show "
                     "that the code runs end to end; they say nothing about GPU figures.")
    return "\n".join(parts)


def merge(paths: list[Path]) -> dict:
    """Results of several runs (e.g. one process per model) as one: machine and settings of the first."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = dict(runs[0], models={})
    for r in runs:
        out["models"].update(r["models"])
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="shapes",
                    help="comma-separated: shapes, sd2 / sdxl (real configurations, random weights; for a GPU), "
                         "sd2arch (SD2's UNet at 256 px), tiny or a diffusers directory")
    ap.add_argument("--steps", type=int, default=None,
                    help="inference steps (default 30 for sd2/sdxl on a GPU, 20 otherwise, 3 for sd2arch on a CPU; "
                         "at most 10 with --quick, 2 for sd2/sdxl)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repeats of the diffusers, attention and fixed-rows comparisons (default 3, 2 with --quick)")
    ap.add_argument("--images", type=int, default=None,
                    help="images of the attention comparison (default 4; 2 for sdxl, for sd2arch on a CPU or with --quick)")
    ap.add_argument("--batch", type=int, default=None,
                    help="images of the fixed-rows comparison (default 16; 4 for sd2arch on a CPU or with --quick)")
    ap.add_argument("--fixed-rows", default="auto",
                    help="the sampler's fixed_rows: auto (on a CPU 8 for small UNets, 2 for SD's; off on a GPU and "
                         "for sd2/sdxl with --quick), 0 (off) or rows")
    ap.add_argument("--option-images", type=int, default=None,
                    help="images of the speed-option comparison (default 16 at 10 steps; 2 at 3 steps for sd2arch on a CPU)")
    ap.add_argument("--options", choices=("auto", "on", "off"), default="auto",
                    help="the speed-option comparison (auto: off for sd2 / sdxl, whose GPU run has no time for it)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (inductor; needs a C++ compiler on a CPU)")
    ap.add_argument("--size", type=int, default=None, help="sd2/sdxl: image side in px (default 512 / 1024; 64 with --quick)")
    ap.add_argument("--text-layers", type=int, default=None,
                    help="sd2/sdxl: layers of each text encoder (default the real 23 / 12+32; 1 with --quick)")
    ap.add_argument("--narrow", choices=("auto", "on", "off"), default="auto",
                    help="sd2/sdxl: ~1/10 of the channels (auto: on for --quick on a CPU, a dry run of the code path)")
    ap.add_argument("--sweep-steps", type=int, default=None,
                    help="sd2/sdxl: steps of the shared-prefix sweep (default 30 for sd2, 10 for sdxl on a GPU)")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="sd2/sdxl: cap of the largest-batch search in images (default 256 sd2, 64 sdxl)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds after which the parts not yet started are skipped (each model's run keeps what it has)")
    ap.add_argument("--quick", action="store_true", help="fewer steps, repeats and images (on a CPU without the bf16 + 16-row option): a smoke run")
    ap.add_argument("--out", type=Path, default=None,
                    help="also write the JSON here (rewritten after each measured part, so a killed run keeps its figures)")
    ap.add_argument("--report", type=Path, nargs="+", default=None,
                    help="measure nothing: print the tables of these JSON files (one run per model) merged; with --out, write the merge")
    args = ap.parse_args(argv)
    if args.report:
        results = merge(args.report)
        for m in results["models"].values():  # projections of partial runs (a part killed by the time limit)
            if m.get("projection") is None:
                m["projection"] = projections(m)
        print(report(results))
        line = json.dumps(results, sort_keys=True)
        print(line)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(line + "\n")
        return results
    device = pick_device(args.device)
    repeats = args.repeats or (2 if args.quick else 3)
    if args.quick and args.repeats is None and device.type == "cpu" and any(
            n.strip() in REAL for n in args.models.split(",")):
        repeats = 1  # the CPU dry run of the GPU script: the code path, not the figures
    results = dict(machine=machine(device), repeats=repeats, quick=args.quick, models={})
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} logical cores, torch {m['torch']} ({m['torch_threads']} threads, "
          f"OMP_NUM_THREADS={m['omp_num_threads'] or 'unset'}), diffusers {m['diffusers']}; device {device}"
          + (f" ({m['gpu']})" if "gpu" in m else "") + f"; load average at start {m['load_average_start']:.2f}")

    def save():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, sort_keys=True) + "\n")

    started = time.perf_counter()

    def part(label, entry, key, fn):
        """One measurement; a failure is recorded (and printed) and the run goes on; past --budget-s, skipped."""
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            entry.setdefault("skipped", []).append(f"{key}: past the --budget-s of {args.budget_s} s")
            print(f"  {label}: SKIPPED (past --budget-s {args.budget_s})", flush=True)
            return
        t = time.perf_counter()
        try:
            entry[key] = fn()
        except Exception as err:  # noqa: BLE001 - a one-shot GPU run keeps every other figure
            traceback.print_exc()
            entry.setdefault("errors", {})[key] = f"{type(err).__name__}: {err}"[:500]
            print(f"  {label}: FAILED ({type(err).__name__}: {str(err)[:200]})", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            print(f"  {label}: {time.perf_counter() - t:.1f} s", flush=True)
        save()

    for name in [s.strip() for s in args.models.split(",") if s.strip()]:
        real = name in REAL
        d = defaults(name, device, args.quick)
        narrowed = args.narrow == "on" or (args.narrow == "auto" and d.get("narrowed", False))
        t0 = time.perf_counter()
        pipe, about = load_model(name, device, args.size or d.get("size"), args.text_layers or d.get("text_layers"),
                                 narrowed) if real else load_model(name, device)
        built_s = time.perf_counter() - t0
        steps, images, batch = args.steps or d["steps"], args.images or d["images"], args.batch or d["batch"]
        fixed = args.fixed_rows if args.fixed_rows != "auto" else ("auto" if not real or device.type == "cuda" or not args.quick else 0)
        fixed = fixed if fixed == "auto" else int(fixed)
        sampler = NegativeSampler(pipe, steps=steps, fixed_rows=fixed)
        off = NegativeSampler(pipe, steps=steps, fixed_rows=0)
        print(f"{name}: {about}; built in {built_s:.1f} s; {steps} steps = {sampler.n_calls} UNet calls, dtype {pipe.unet.dtype}, "
              f"fixed rows {sampler.fixed_rows or 'off'}", flush=True)
        px = sampler.height
        short = f"{px} px, {str(pipe.unet.dtype).replace('torch.', '')}, UNet {parameters(pipe.unet) / 1e6:.0f} M parameters"
        entry = dict(about=about, short=short, steps=steps, n_calls=sampler.n_calls, dtype=str(pipe.unet.dtype), built_s=built_s,
                     fixed_rows_used=sampler.fixed_rows, unet_parameters=parameters(pipe.unet))
        results["models"][name] = entry
        versus = {"off": off} | ({"on": sampler} if sampler.fixed_rows else {})
        part("sampler vs diffusers", entry, "diffusers", lambda: versus_diffusers(versus, repeats, device))
        part("attention on/off", entry, "attention", lambda: attention_cost(sampler, repeats, images, device))
        if real:
            part("largest batch", entry, "capacity",
                 lambda: largest_batch(pipe, device, args.max_batch or d["cap"], on_cpu=args.max_batch is not None))
            b = entry.get("capacity", {}).get("batch") or d["batch"]
            while True:
                part(f"throughput at batch {b}", entry, "throughput", lambda: throughput(pipe, device, b, d["throughput_steps"]))
                err = entry.get("errors", {}).get("throughput")
                if err is None or "OutOfMemory" not in err or b == 1:
                    break
                entry["errors"][f"throughput_at_{b}"] = entry["errors"].pop("throughput")
                b //= 2  # the longer run did not fit after all: half the batch
            entry["projection"] = projections(entry)
            sweep_steps = args.sweep_steps or d["sweep_steps"]
            sweeper = sampler if sweep_steps == steps else NegativeSampler(pipe, steps=sweep_steps, fixed_rows=fixed)
            part(f"step sweep ({sweep_steps} steps)", entry, "sweep", lambda: step_sweep(sweeper, device) | {"steps": sweep_steps})
            if sweeper.fixed_rows:
                part("step sweep, fixed rows off", entry, "sweep_off",
                     lambda: step_sweep(NegativeSampler(pipe, steps=sweep_steps, fixed_rows=0), device) | {"steps": sweep_steps})
        else:
            part("step sweep", entry, "sweep", lambda: step_sweep(sampler, device))
            if sampler.fixed_rows:  # lone images pay the padding of their blocks: the engine's own gain is without
                part("step sweep, fixed rows off", entry, "sweep_off", lambda: step_sweep(off, device))
        if args.options == "on" or (args.options == "auto" and not real):
            o_steps, o_images = ((3, 2) if name in ("sd2arch", *REAL) and device.type == "cpu"
                                 else (4, 2) if args.quick else (min(10, steps), batch))  # --quick: the code path
            part("speed options", entry, "options",
                 lambda: options(pipe, o_steps, args.option_images or o_images, 1 if args.quick else repeats, device, args.compile,
                                 skip=QUICK_SKIPS if args.quick and device.type == "cpu" else ()))
            on, no = entry["options"]["options"]["fixed rows (default)"], entry["options"]["options"]["fixed rows off"]
            entry["fixed_rows"] = dict(images=entry["options"]["images"], fixed_rows=cpu_fixed_rows(pipe.unet, sampler.latent_shape),
                                       wall_on_s=on["wall_s"], wall_off_s=no["wall_s"], wall_ratio=on["wall_s"] / no["wall_s"],
                                       repeats=entry["options"]["repeats"], steps=o_steps)
        entry["prefix_reuse"] = prefix_reuse_rows(NegativeSampler(pipe, steps=30).n_calls, 3)
        save()
        del pipe, sampler, off
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["machine"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print()
    print(report(results))
    print()
    line = json.dumps(results, sort_keys=True)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    return results


if __name__ == "__main__":
    main()
