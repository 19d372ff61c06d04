#!/usr/bin/env python
"""Train "shapes_clip": a small CLIP (transformers CLIPModel) on the shapes world.

Contrastive image-text training (CLIP's symmetric cross-entropy, `return_loss=True`) from scratch
on 32x32 scenes that `negstudy.shapes.world` draws on the fly (a fresh batch every step, never
repeated). Every caption describes the whole image (every object, the background, the attribute),
in varied phrasing: the world's own caption with every object named, or objects named by their
noun ("a ball"), by colour and shape ("a red circle") or both ("a red ball"); the background and
the attribute are sometimes left out, and sometimes the caption names a single object. Both "a
ball" and "a red circle" thus point at the red disc. Images get, with probability `--augment`
each, the colour drift of images sampled from a small diffusion model (off-palette background and
objects, a tint, faint noise, soft edges; see `augment`), so that the model judges samples too.

The result, `<out>/model/`, loads like openai/clip-vit-large-patch14:
`CLIPModel.from_pretrained(dir)` and `CLIPProcessor.from_pretrained(dir)` (a word-level
CLIPTokenizer built by `negstudy.tokenizer`, and a CLIPImageProcessor at 32x32 with the
normalisation used here, mean = std = 0.5).

Budget-driven: `--minutes` (wall time of the whole run, resumed sessions included) and/or
`--steps`. `<out>/checkpoint/` is written atomically every `--save-every-minutes` and at the end;
`--resume` continues from it. At the end the zero-shot accuracy on fresh world images is printed
and written to `<out>/model/zero_shot.json`.

Examples:
    python scripts/train_clip.py --out runs/shapes_clip --minutes 14      # the shipped model
    python scripts/train_clip.py --out runs/shapes_clip --resume --minutes 20
    python scripts/train_clip.py --out /tmp/t --steps 3 --batch-size 8 --width 32 --vision-layers 1 \\
        --text-layers 1 --eval-images 16
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # `python scripts/train_clip.py` puts scripts/, not the repo, on the path
    sys.path.insert(0, str(_REPO))

from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor  # noqa: E402

from negstudy.records import find_checkpoint, fresh_tmp_dir, replace_dir, write_csv  # noqa: E402
from negstudy.shapes import world  # noqa: E402
from negstudy.tokenizer import build_clip_tokenizer  # noqa: E402

MAX_LEN = 77
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # pixels / 255 -> [-1, 1]
EVAL_SEED = 2_000_003  # world seed of the zero-shot measurement (never a training seed in practice)
LR_FLOOR = 0.1

COLOURS = {"ball": ("red",), "sun": ("yellow",), "box": ("blue",), "tree": ("green",), "kite": ("magenta", "purple")}
SHAPE_WORDS = {"disc": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",), "diamond": ("diamond",)}
EXTRA_WORDS = ["an", "with", "photo", "picture", "image"]


def tokenizer_words() -> list[str]:
    words = set(world.VOCABULARY) | set(EXTRA_WORDS)
    for names in list(COLOURS.values()) + list(SHAPE_WORDS.values()):
        words |= set(names)
    return sorted(words)


# --------------------------------------------------------------------------------------------
# captions


def object_phrase(name: str, style: str, rng: np.random.Generator) -> str:
    """'a ball' (noun), 'a red circle' (shape) or 'a red ball' (colour)."""
    colour = COLOURS[name][int(rng.integers(len(COLOURS[name])))]
    shapes = SHAPE_WORDS[world.OBJECTS[name].shape]
    if style == "noun":
        return f"a {name}"
    if style == "shape":
        return f"a {colour} {shapes[int(rng.integers(len(shapes)))]}"
    return f"a {colour} {name}"


def join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(scene: world.Scene, rng: np.random.Generator) -> str:
    """One caption of a scene (see the module docstring for the mix)."""
    names = [o.name for o in scene.objects]
    u = rng.random()
    if u < 0.3:  # the world's own caption, every object and the attribute named, in random order
        named = tuple(names[i] for i in rng.permutation(len(names)))
        return world.caption(world.Scene(scene.background, scene.objects, scene.attribute, named, scene.attribute is not None))
    if names and u < 0.4:  # a single object, nothing else
        name = names[int(rng.integers(len(names)))]
        return object_phrase(name, ("noun", "shape", "colour")[int(rng.integers(3))], rng)
    style = ("noun", "shape", "mixed")[int(rng.choice(3, p=[0.35, 0.45, 0.2]))]
    phrases = [object_phrase(n, style if style != "mixed" else ("noun", "shape", "colour")[int(rng.integers(3))], rng)
               for n in (names[i] for i in rng.permutation(len(names)))]
    keep_background = not phrases or rng.random() < 0.8
    if phrases:
        text = join(phrases) + (f" {world.BACKGROUND_PHRASES[scene.background]}" if keep_background else "")
    else:
        text = f"a view of the {scene.background}"
    if scene.attribute is not None and rng.random() < 0.85:
        text += f", {scene.attribute}"
    return text


def augment(images: np.ndarray, scenes: list[world.Scene], rng: np.random.Generator, p: float) -> np.ndarray:
    """Colour drift of the kind a small diffusion model draws, on a fraction ``p`` of the images.

    Sampled images (see the shapes model's card) have off-palette backgrounds and objects, a global
    tint, a faint pixel noise and soft edges; a CLIP that saw only the world's exact palette reads
    such images as anything. Each of these is applied independently with probability ``p``:
    background pixels shifted by a per-channel offset in [-80, 80]; each object's by one in
    [-30, 30]; the whole image by one in [-30, 30]; Gaussian noise of std in [2, 10] (under the
    'noisy' attribute's 18); one [1, 2, 1] blur pass (the 'blurry' attribute is two passes of a
    5-tap kernel). images: uint8 (n, 32, 32, 3).
    """
    out = images.astype(np.float32)
    n = len(images)
    shift_background, shift_objects = rng.random(n) < p, rng.random(n) < p
    for i in np.flatnonzero(shift_background | shift_objects):
        masks = [world.object_mask(obj) for obj in scenes[i].objects]
        if shift_background[i]:
            out[i][~np.any(masks, axis=0) if masks else slice(None)] += rng.uniform(-80, 80, size=3).astype(np.float32)
        if shift_objects[i]:
            for m in masks:
                out[i][m] += rng.uniform(-30, 30, size=3).astype(np.float32)
    tint = rng.random(n) < p
    out[tint] += rng.uniform(-30, 30, size=(int(tint.sum()), 1, 1, 3)).astype(np.float32)
    noisy = rng.random(n) < p
    std = rng.uniform(2, 10, size=(int(noisy.sum()), 1, 1, 1)).astype(np.float32)
    out[noisy] += std * rng.standard_normal(size=(int(noisy.sum()),) + out.shape[1:]).astype(np.float32)
    soft = np.flatnonzero(rng.random(n) < p)
    if len(soft):
        x = np.pad(out[soft], ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        x = 0.25 * x[:, :-2] + 0.5 * x[:, 1:-1] + 0.25 * x[:, 2:]
        out[soft] = 0.25 * x[:, :, :-2] + 0.5 * x[:, :, 1:-1] + 0.25 * x[:, :, 2:]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_batch(n: int, seed: int, tokenizer, p_augment: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n fresh scenes: pixel_values float (n, 3, 32, 32) in [-1, 1], input_ids and attention_mask (n, L)."""
    scene_ss, noise_ss, caption_ss, augment_ss = np.random.SeedSequence(seed).spawn(4)
    scene_rng, caption_rng = np.random.default_rng(scene_ss), np.random.default_rng(caption_ss)
    scenes = [world.sample_scene(scene_rng, p_named=1.0, p_named_attribute=1.0) for _ in range(n)]
    images = world.render_batch(scenes, np.random.default_rng(noise_ss))
    if p_augment > 0:
        images = augment(images, scenes, np.random.default_rng(augment_ss), p_augment)
    tok = tokenizer([describe(s, caption_rng) for s in scenes], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    return to_pixels(images), tok.input_ids, tok.attention_mask


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, 32, 32, 3) -> float (n, 3, 32, 32), exactly what the saved CLIPImageProcessor gives."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------
# model, processor


def build_model(args, tokenizer) -> CLIPModel:
    text = dict(vocab_size=len(tokenizer), hidden_size=args.width, intermediate_size=4 * args.width,
                num_hidden_layers=args.text_layers, num_attention_heads=args.heads, max_position_embeddings=MAX_LEN,
                projection_dim=args.width, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=world.RESOLUTION, patch_size=args.patch_size, num_channels=3, hidden_size=args.width,
                  intermediate_size=4 * args.width, num_hidden_layers=args.vision_layers, num_attention_heads=args.heads,
                  projection_dim=args.width)  # the sub-configs' own projection_dim serves CLIP{Text,Vision}ModelWithProjection
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.width))


def build_processor(tokenizer) -> CLIPProcessor:
    r = world.RESOLUTION
    images = CLIPImageProcessorPil(size={"shortest_edge": r}, crop_size={"height": r, "width": r},
                                   image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def lr_at(args, step: int, elapsed: float) -> float:
    """Linear warm-up, then cosine to LR_FLOOR x peak over whichever budget is closer to its end."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    prog = 0.0
    if args.steps:
        prog = max(prog, step / args.steps)
    if args.minutes and args.minutes > 0:
        prog = max(prog, elapsed / (60.0 * args.minutes))
    prog = min(1.0, prog)
    return args.lr * warm * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * prog)))


# --------------------------------------------------------------------------------------------
# checkpoint and export (write to <name>.tmp, then rename: a crash never leaves a half directory)










def save_checkpoint(out: Path, state: dict):
    tmp = fresh_tmp_dir(out / "checkpoint")
    torch.save(state, tmp / "state.pt")
    write_csv(tmp / "training_log.csv", ["step", "loss", "lr", "logit_scale", "elapsed_s"], state["log"])
    replace_dir(tmp, out / "checkpoint")


def export_model(out: Path, model: CLIPModel, processor: CLIPProcessor, dtype: torch.dtype, meta: dict, log_rows):
    tmp = fresh_tmp_dir(out / "model")
    (copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model).save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    processor.image_processor.save_pretrained(tmp)  # preprocessor_config.json, as openai's checkpoints have
    (tmp / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    write_csv(tmp / "training_log.csv", ["step", "loss", "lr", "logit_scale", "elapsed_s"], log_rows)
    replace_dir(tmp, out / "model")


# --------------------------------------------------------------------------------------------
# zero-shot measurement on fresh world images


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties count one half."""
    pos, neg = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
    return float(((pos > neg).mean() + 0.5 * (pos == neg).mean()))


def measure(model_dir: Path, n: int, seed: int = EVAL_SEED) -> dict:
    """Zero-shot numbers of the exported model, read through negstudy's ClipEvaluator."""
    from negstudy.evaluators.clip import ClipEvaluator

    model = CLIPModel.from_pretrained(str(model_dir), dtype=torch.float32)
    ev = ClipEvaluator(model, CLIPProcessor.from_pretrained(str(model_dir)), world="shapes", batch_size=256)
    images, _, scenes = world.sample_dataset(n, seed)
    truth = np.array([[o in s.object_names for o in world.OBJECT_NAMES] for s in scenes])  # (n, 5)
    img = ev.image_embeds(images)
    res: dict = {"images": n, "seed": seed, "auc": {}}
    for j, name in enumerate(world.OBJECT_NAMES):
        colour = COLOURS[name][0]
        shape = SHAPE_WORDS[world.OBJECTS[name].shape][0]
        for text in (f"a {name}", f"a {colour} {shape}"):
            s = (100 * (img @ ev.text_embeds([text])[0]).clamp(min=0)).numpy()
            res["auc"][text] = round(auc(s[truth[:, j]], s[~truth[:, j]]), 4)
    found = ev._decode(img)
    pred = np.array([[o in f for o in world.OBJECT_NAMES] for f in found])
    res["present_accuracy"] = round(float((pred == truth).mean()), 4)
    res["present_balanced_accuracy"] = round(float(0.5 * (pred[truth].mean() + (~pred[~truth]).mean())), 4)
    res["present_recall"] = round(float(pred[truth].mean()), 4)
    res["present_specificity"] = round(float((~pred[~truth]).mean()), 4)
    res["object_set_exact"] = round(float((pred == truth).all(1).mean()), 4)
    res["present_accuracy_per_object"] = {o: round(float((pred[:, j] == truth[:, j]).mean()), 4) for j, o in enumerate(world.OBJECT_NAMES)}
    # retrieval: which of the 5 single-object phrases (noun / colour+shape) fits an image with exactly one object
    single = np.array([len(s.objects) == 1 for s in scenes])
    label = np.array([world.OBJECT_NAMES.index(s.objects[0].name) if len(s.objects) == 1 else -1 for s in scenes])
    for kind, texts in (("noun", [f"a {o}" for o in world.OBJECT_NAMES]),
                        ("colour_shape", [f"a {COLOURS[o][0]} {SHAPE_WORDS[world.OBJECTS[o].shape][0]}" for o in world.OBJECT_NAMES])):
        top = (img[single] @ ev.text_embeds(texts).T).argmax(-1).numpy()
        res[f"top1_single_object_{kind}"] = round(float((top == label[single]).mean()), 4)
    bg = (img @ ev.text_embeds([f"a view of the {b}" for b in world.BACKGROUND_NAMES]).T).argmax(-1).numpy()
    truth_bg = np.array([world.BACKGROUND_NAMES.index(s.background) for s in scenes])
    res["top1_background"] = round(float((bg == truth_bg).mean()), 4)
    res["single_object_images"] = int(single.sum())
    return res


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output directory (checkpoint/, model/)")
    p.add_argument("--minutes", type=float, default=14.0, help="total training wall time in minutes, resumed sessions included (<= 0: none)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: no step limit)")
    p.add_argument("--batch-size", type=int, default=256, help="images (and captions) per contrastive batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint/ (model config from the checkpoint)")
    p.add_argument("--save-every-minutes", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--export-dtype", choices=("fp16", "fp32"), default="fp32")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--width", type=int, default=96, help="hidden size of both towers and of the joint embedding")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--augment", type=float, default=0.3,
                   help="probability of each colour-drift augmentation (off-palette background, tint, faint noise, soft edges; 0: none)")
    p.add_argument("--eval-images", type=int, default=2000, help="fresh world images for the zero-shot measurement (0: none)")
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)
    if (args.minutes is None or args.minutes <= 0) and args.steps is None:
        p.error("give --steps or a positive --minutes")
    if args.width % args.heads:
        p.error(f"--heads {args.heads} must divide --width {args.width}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer(tokenizer_words(), model_max_length=MAX_LEN)
    processor = build_processor(tokenizer)

    state = None
    if args.resume:
        ckpt = find_checkpoint(out)
        if ckpt is None:
            raise SystemExit(f"--resume: no checkpoint under {out}")
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        model = CLIPModel(CLIPConfig.from_dict(state["config"]))
        model.load_state_dict(state["model"])
        print(f"resumed from {ckpt} at step {state['step']} ({state['elapsed'] / 60:.1f} min trained)", flush=True)
    else:
        if find_checkpoint(out) is not None:
            raise SystemExit(f"{out} holds a checkpoint: pass --resume to continue it, or choose another --out")
        model = build_model(args, tokenizer)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=args.weight_decay)
    step, elapsed_prev, log_rows = 0, 0.0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_prev, log_rows = state["step"], state["elapsed"], state["log"]
        torch.set_rng_state(state["torch_rng"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"CLIP {n_params / 1e6:.2f}M params | vision {model.config.vision_config.num_hidden_layers} layers x "
          f"{model.config.vision_config.hidden_size}, patch {model.config.vision_config.patch_size} | text "
          f"{model.config.text_config.num_hidden_layers} layers x {model.config.text_config.hidden_size} | vocab {len(tokenizer)} | "
          f"batch {args.batch_size}", flush=True)

    t_start = time.monotonic()

    def elapsed() -> float:
        return elapsed_prev + time.monotonic() - t_start

    def budget_left() -> bool:
        if args.steps is not None and step >= args.steps:
            return False
        return not (args.minutes and args.minutes > 0 and elapsed() >= 60 * args.minutes)

    def save():
        save_checkpoint(out, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": model.config.to_dict(),
                              "step": step, "elapsed": elapsed(), "log": log_rows, "torch_rng": torch.get_rng_state(),
                              "args": vars(args) | {"out": str(out)}})
        meta = {"world": "shapes", "train_steps": step, "train_minutes": round(elapsed() / 60, 3), "batch_size": args.batch_size,
                "seed": args.seed, "params": n_params, "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD)}
        export_model(out, model, processor, torch.float16 if args.export_dtype == "fp16" else torch.float32, meta, log_rows)

    bar = tqdm(total=args.steps, initial=step, unit="it", dynamic_ncols=True, mininterval=1.0)
    last_save = time.monotonic()
    loss_sum, n_sum, lr = 0.0, 0, args.lr
    try:
        while budget_left():
            # a batch is a function of (seed, step) alone: a resumed run sees what it would have seen
            seed = int(np.random.SeedSequence([args.seed, step]).generate_state(1)[0])
            pixels, ids, mask = make_batch(args.batch_size, seed, tokenizer, args.augment)
            lr = lr_at(args, step, elapsed())
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
            step += 1
            loss_sum, n_sum = loss_sum + loss.item(), n_sum + 1
            if not math.isfinite(loss.item()):
                raise SystemExit(f"loss is {loss.item()} at step {step}; stopping (last checkpoint kept)")
            if step % args.log_every == 0 or not budget_left():
                log_rows.append([step, f"{loss_sum / n_sum:.5f}", f"{lr:.6g}", f"{model.logit_scale.exp().item():.3f}", f"{elapsed():.1f}"])
                bar.set_postfix(loss=f"{loss_sum / n_sum:.3f}", scale=f"{model.logit_scale.exp().item():.1f}", min=f"{elapsed() / 60:.1f}")
                loss_sum, n_sum = 0.0, 0
            bar.update(1)
            if budget_left() and time.monotonic() - last_save >= 60 * args.save_every_minutes:
                save()
                last_save = time.monotonic()
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step}; saving", flush=True)
    finally:
        bar.close()
    model.eval()
    save()
    print(f"trained {step} steps ({step * args.batch_size:,} images) in {elapsed() / 60:.2f} min; model exported to {out / 'model'}", flush=True)

    if args.eval_images > 0:
        res = measure(out / "model", args.eval_images)
        (out / "model" / "zero_shot.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res, indent=1), flush=True)


if __name__ == "__main__":
    main()
