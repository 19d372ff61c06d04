"""negstudy's benchmark, every figure measured in one run of this script.

    python scripts/bench.py [--models shapes[,sd2arch]] [--steps N] [--device auto] [--repeats 3] [--compile] [--quick] [--out bench.json]

For each model:

1. step sweep: a delayed negative from EVERY start step (``from_step`` k = 0..n_calls), one pair
   and seed, on the shared-prefix engine (one ``generate`` call) against each schedule run alone:
   UNet batch rows evaluated, wall time, and the max |pixel difference| between the two; with the
   sampler's fixed rows and, where it uses them, without (a lone image's 2 rows padded to a block
   of 8 make the independent runs slower, which flatters the shared engine);
2. the sampler against diffusers' ``StableDiffusionPipeline``, schedule ``always``, same model,
   prompt and seed, one image: wall-time ratio (target <= 1.05) after a warm-up, median of
   ``--repeats`` interleaved runs, and the max |pixel difference|; with the sampler's fixed rows
   off (diffusers' own batching: the engine's overhead) and, where the sampler uses them (the
   CPU), on;
3. cross-attention recording (``AttentionRecorder``, paper layers, word maps kept) on against off
   on a batch of seeds: wall-time ratio (target <= 1.3) and recorded bytes per image;
4. the price of batch-size-independent images: fixed rows (``NegativeSampler.fixed_rows``) on
   against off on one batch of ``--batch`` images;
5. rows per second under each speed option (:data:`OPTIONS`: fixed-row block sizes, channels_last,
   bf16 autocast; torch.compile with ``--compile``) on one batch, as ratios to the default measured
   in the same run (wall and CPU time), with the pixel difference from the default's images and
   whether each option's images are still batch-size independent; and the critical-step study's
   UNet rows per (pair, seed) before and after branching from the screened trajectories.

The default (the shapes model only) takes a few minutes on a 2-core CPU; ``sd2arch`` is for a GPU
(or a patient CPU: minutes per image).

Everything but the "off" runs uses the sampler as ``--fixed-rows`` sets it (default: the
sampler's own choice: on a CPU 8 rows for the shapes model, 2 for SD2's UNet; off on a GPU).

Models: ``shapes`` (the shipped 32 px pixel-space model), ``sd2arch`` (Stable Diffusion 2 base's
UNet and VAE architecture with random weights at 256 px, built from configs; its CLIP text encoder
is random with SD2's width 1024 but one layer, since text encoding is a negligible share of
sampling), ``tiny`` (negstudy.tiny), or a diffusers directory. Prints the machine, a Markdown
table for the README and one JSON line; ``--out`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from negstudy.attention import AttentionRecorder
from negstudy.config import ModelConfig
from negstudy.models import load_pipeline, pick_device
from negstudy.sampler import Batch, NegativeSampler, cpu_fixed_rows
from negstudy.schedules import Always, FromStep

PROMPT, NEGATIVE, SEED = "a ball on the grass", "sun", 3
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
TARGET_DIFFUSERS, TARGET_ATTENTION = 1.05, 1.3


# ----------------------------------------------------------------------------- models


def sd2_arch_pipeline(device: torch.device, dtype: torch.dtype, size: int = 256, text_layers: int = 1, seed: int = 0):
    """SD2 base's UNet and VAE with random weights, a random ``text_layers``-layer CLIP text encoder of width 1024."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from negstudy.tiny import TINY_WORDS
    from negstudy.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(sorted({*TINY_WORDS, "ball", "grass", "sun"}))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD2_UNET | {"sample_size": size // 8})
    vae = AutoencoderKL(**SD2_VAE | {"sample_size": size})
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=text_layers,
        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=PNDMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def load_model(name: str, device: torch.device):
    """(pipeline, description) of a model named on the command line."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if name == "sd2arch":
        return sd2_arch_pipeline(device, dtype), ("SD2-base architecture, random weights, 256 px (32x32 latents); "
                                                  "random CLIP text encoder of width 1024 with 1 layer (SD2: 24)")
    if name == "tiny":
        from negstudy.tiny import tiny_pipeline

        pipe = tiny_pipeline(0).to(device)
        return (pipe if dtype == torch.float32 else pipe.to(device, dtype)), "negstudy.tiny random model (16x16 latents)"
    path = "builtin:shapes" if name == "shapes" else name
    pipe = load_pipeline(OmegaConf.structured(ModelConfig(name=Path(name).name, path=path)), device)
    px = pipe.unet.config.sample_size * (pipe.vae_scale_factor if pipe.vae is not None else 1)
    return pipe, f"{'shipped shapes model' if name == 'shapes' else path}, {px} px"


def defaults(name: str, device: torch.device, quick: bool) -> dict:
    """steps, images (attention) and batch (fixed rows) of a model when the command line gives none."""
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
                         max_pixel_diff=float(np.abs(ours[name] - ref).max()))
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


def options(pipe, steps: int, images: int, repeats: int, device, compile_unet: bool = False) -> dict:
    """Rows per second of the sampler under each speed option, on one batch of ``images`` seeds (``always``).

    Interleaved repeats, medians of wall and process CPU time (CPU time is steadier on a shared
    machine); ratios against the first option measured in the same run; max |pixel difference|
    from its images; whether the images are byte-identical to the same option's images generated
    one by one (batch-size independence).
    """
    opts = dict(OPTIONS)
    if compile_unet:
        opts["torch.compile (inductor)"] = dict(compile=True)
    prompts = [PROMPT, "a box in the sky", "a tree on the sand", "a kite at night"]
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

    def row(label, fmt):
        lines.append(f"| {label} | " + " | ".join(fmt(m) for m in models.values()) + " |")

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
        if not any(key in m["diffusers"] for m in models.values()):
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
    row("recorded attention data per image", lambda m: f"{m['attention']['bytes_per_image'] / 2**20:.2f} MiB")
    names = list(dict.fromkeys(k for m in models.values() for k in m["options"]["options"]))
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="shapes",
                    help="comma-separated: shapes, sd2arch (SD2's UNet: minutes per image on a CPU; for a GPU), "
                         "tiny or a diffusers directory")
    ap.add_argument("--steps", type=int, default=None,
                    help="inference steps (default 30, 3 for sd2arch on a CPU; at most 10 with --quick)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repeats of the diffusers, attention and fixed-rows comparisons (default 3, 2 with --quick)")
    ap.add_argument("--images", type=int, default=None,
                    help="images of the attention comparison (default 4; 2 for sd2arch on a CPU or with --quick)")
    ap.add_argument("--batch", type=int, default=None,
                    help="images of the fixed-rows comparison (default 16; 4 for sd2arch on a CPU or with --quick)")
    ap.add_argument("--fixed-rows", default="auto",
                    help="the sampler's fixed_rows: auto (on a CPU 8 for small UNets, 2 for SD's; off on a GPU), 0 (off) or rows")
    ap.add_argument("--option-images", type=int, default=None,
                    help="images of the speed-option comparison (default 16 at 10 steps; 2 at 3 steps for sd2arch on a CPU)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (inductor; needs a C++ compiler on a CPU)")
    ap.add_argument("--quick", action="store_true", help="fewer steps, repeats and images: a smoke run")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    repeats = args.repeats or (2 if args.quick else 3)
    fixed = args.fixed_rows if args.fixed_rows == "auto" else int(args.fixed_rows)
    results = dict(machine=machine(device), repeats=repeats, quick=args.quick, models={})
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} logical cores, torch {m['torch']} ({m['torch_threads']} threads, "
          f"OMP_NUM_THREADS={m['omp_num_threads'] or 'unset'}), diffusers {m['diffusers']}; device {device}"
          + (f" ({m['gpu']})" if "gpu" in m else "") + f"; load average at start {m['load_average_start']:.2f}")
    for name in [s.strip() for s in args.models.split(",") if s.strip()]:
        pipe, about = load_model(name, device)
        d = defaults(name, device, args.quick)
        steps, images, batch = args.steps or d["steps"], args.images or d["images"], args.batch or d["batch"]
        sampler = NegativeSampler(pipe, steps=steps, fixed_rows=fixed)
        off = NegativeSampler(pipe, steps=steps, fixed_rows=0)
        print(f"{name}: {about}; {steps} steps = {sampler.n_calls} UNet calls, dtype {pipe.unet.dtype}, "
              f"fixed rows {sampler.fixed_rows or 'off'}", flush=True)
        entry = dict(about=about, steps=steps, n_calls=sampler.n_calls, dtype=str(pipe.unet.dtype),
                     fixed_rows_used=sampler.fixed_rows)
        entry["sweep"] = step_sweep(sampler, device)
        if sampler.fixed_rows:  # lone images pay the padding of their blocks: the engine's own gain is without
            entry["sweep_off"] = step_sweep(off, device)
        entry["diffusers"] = versus_diffusers({"off": off} | ({"on": sampler} if sampler.fixed_rows else {}), repeats, device)
        entry["attention"] = attention_cost(sampler, repeats, images, device)
        o_steps, o_images = (3, 2) if name == "sd2arch" and device.type == "cpu" else (min(10, steps), 4 if args.quick else batch)
        entry["options"] = options(pipe, o_steps, args.option_images or o_images, repeats, device, args.compile)
        on, no = entry["options"]["options"]["fixed rows (default)"], entry["options"]["options"]["fixed rows off"]
        entry["fixed_rows"] = dict(images=entry["options"]["images"], fixed_rows=cpu_fixed_rows(pipe.unet, sampler.latent_shape),
                                   wall_on_s=on["wall_s"], wall_off_s=no["wall_s"], wall_ratio=on["wall_s"] / no["wall_s"],
                                   repeats=repeats, steps=o_steps)
        entry["prefix_reuse"] = prefix_reuse_rows(NegativeSampler(pipe, steps=30).n_calls, 3)
        results["models"][name] = entry
        del pipe, sampler, off
    results["machine"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print()
    print(markdown(results))
    print()
    line = json.dumps(results, sort_keys=True)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    return results


if __name__ == "__main__":
    main()
