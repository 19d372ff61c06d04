"""Build the labelled set of GENERATED shapes images (tests/fixtures/generated): samples and contact sheets.

The set validates the readers (oracle, shapes CLIP) on what the model really draws. It is built in
two stages, because the negatives must name what a plain sample showed without the caption
naming it, and only the by-eye labels say what a sample showed:

    # stage 1: 150 plain samples (no negative) -> PNGs, samples.csv, sheets in /tmp/reader_sheets
    OMP_NUM_THREADS=1 python scripts/make_reader_set.py plain
    # ... label the sheets by eye into tests/fixtures/generated/labels.csv ...
    # stage 2: 60 fresh plain samples and 100 edits of labelled stage-1 samples, interleaved by id
    OMP_NUM_THREADS=1 python scripts/make_reader_set.py plain2
    OMP_NUM_THREADS=1 python scripts/make_reader_set.py edits
    OMP_NUM_THREADS=1 python scripts/make_reader_set.py sheets   # sheets of the unlabelled samples
    # ... label them ...
    # a fresh set, after the readers' rules are fixed: 64 attribute-heavy samples, all held out
    OMP_NUM_THREADS=1 python scripts/make_reader_set.py fresh --out tests/fixtures/fresh

Samples: captions from the world's own distribution (``world.sample_scene`` + ``world.caption``,
fixed rng), fixed seeds, negstudy's sampler at 30 PNDM steps (31 UNet calls) and guidance 7.5, fp32
on the CPU. An edit is a stage-1 sample's caption and seed again, with the negative naming an object
(or attribute) the labels found in it and the caption does not name, from step ``start`` on
(``from_step``, start in 0, 4, 8, 12, 16): complete removals, half-removed objects and substitutions.

Ids are ``g000``..``g309`` in a fixed random order, so an id says neither the stage nor whether the
sample has a negative; the sheets show ids only (label blind: without captions or negatives).
The split (tune / holdout) is a fixed function of the id (:func:`split_of`), decided before any
reader was tuned. Sheets never go into the repository.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from negstudy.shapes import world

# The set of the shipped model (tests/fixtures/generated). The previous model's set
# (in the repository's history at commit 056ed3d) was made with 120 / 84 / 48, STARTS (0, 4, 8, 12), 21
# attribute edits and seeds 2024 / 12 / 120000 by this script as of commit 056ed3d.
N_PLAIN_1, N_EDITS, N_PLAIN_2 = 150, 100, 60
N_TOTAL = N_PLAIN_1 + N_EDITS + N_PLAIN_2
STARTS = (0, 4, 8, 12, 16)  # from_step starts of the edits (UNet-call indices of 31)
ATTRIBUTE_EDITS = 25  # of N_EDITS; the rest name objects
ID_SEED, CAPTION_SEED, SEED_BASE = 2026, 13, 130_000
SAMPLE_FIELDS = ["id", "file", "caption", "negative", "schedule", "seed"]


def ids() -> list[str]:
    """All ids in the order they are handed out: stage 1 takes the first N_PLAIN_1."""
    return [f"g{k:03d}" for k in np.random.default_rng(ID_SEED).permutation(N_TOTAL)]


def split_of(sample_id: str) -> str:
    """holdout for a third of the ids (sha256 of the id mod 3 == 0), tune for the rest; the fresh set's (fNNN) all holdout."""
    if sample_id.startswith("f"):
        return "holdout"
    return "holdout" if int(hashlib.sha256(sample_id.encode()).hexdigest(), 16) % 3 == 0 else "tune"


def captions(n: int) -> list[str]:
    rng = np.random.default_rng(CAPTION_SEED)
    return [world.caption(world.sample_scene(rng)) for _ in range(n)]


def load_sampler(model: str, steps: int, guidance: float):
    from omegaconf import OmegaConf

    from negstudy.config import ModelConfig
    from negstudy.models import load_pipeline, pick_device
    from negstudy.sampler import NegativeSampler

    cfg = OmegaConf.structured(ModelConfig(name="shapes", path=model, dtype="fp32"))
    return NegativeSampler(load_pipeline(cfg, pick_device("cpu")), steps=steps, guidance_scale=guidance)


def schedule_of(text: str):
    from negstudy.schedules import FromStep, Never

    if text == "never":
        return Never()
    if text.startswith("from_step:"):
        return FromStep(int(text.split(":")[1]))
    raise ValueError(f"schedule={text!r}: expected never or from_step:<start>")


def generate(sampler, rows: list[dict], batch_size: int) -> np.ndarray:
    from negstudy.records import to_uint8
    from negstudy.sampler import Batch

    out = []
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        batch = Batch([r["caption"] for r in part], [r["negative"] for r in part], [int(r["seed"]) for r in part],
                      [schedule_of(r["schedule"]).plan(sampler.n_calls) for r in part])
        out.append(to_uint8(sampler.generate(batch)))
        print(f"  {i + len(part)}/{len(rows)} images", file=sys.stderr, flush=True)
    return np.concatenate(out)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_samples(out: Path, rows: list[dict]) -> None:
    path = out / "samples.csv"
    old = read_csv(path) if path.exists() else []
    new_ids = {r["id"] for r in rows}
    merged = sorted([r for r in old if r["id"] not in new_ids] + rows, key=lambda r: r["id"])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, SAMPLE_FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows({k: r[k] for k in SAMPLE_FIELDS} for r in merged)


def sheets(images: dict[str, np.ndarray], sheet_dir: Path, prefix: str, per_row: int, per_col: int, zoom: int) -> None:
    """Contact sheets: images sorted by id, nearest-neighbour x zoom, the id printed under each."""
    sheet_dir.mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=20)
    cell, pad, text_h = 32 * zoom, 8, 26
    order = sorted(images)
    per = per_row * per_col
    for s in range(0, len(order), per):
        chunk = order[s : s + per]
        sheet = Image.new("RGB", (per_row * (cell + pad) + pad, per_col * (cell + text_h + pad) + pad), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for k, sample_id in enumerate(chunk):
            x, y = pad + (k % per_row) * (cell + pad), pad + (k // per_row) * (cell + text_h + pad)
            sheet.paste(Image.fromarray(images[sample_id]).resize((cell, cell), Image.NEAREST), (x, y))
            draw.text((x + cell // 2 - 20, y + cell + 2), sample_id, fill=(0, 0, 0), font=font)
        sheet.save(sheet_dir / f"{prefix}_{s // per + 1:02d}_{chunk[0]}-{chunk[-1]}.png")


LABEL_FIELDS = ["ball", "sun", "box", "tree", "kite", "background", "attribute", "other_blobs"]


def merge(out: Path, parts: list[Path]) -> None:
    """Join labellers' files (id + LABEL_FIELDS + notes) with samples.csv into OUT/labels.csv (kept rows
    of earlier stages stay; an id labelled twice is an error), adding each id's split."""
    samples = {r["id"]: r for r in read_csv(out / "samples.csv")}
    path = out / "labels.csv"
    merged = {r["id"]: r for r in read_csv(path)} if path.exists() else {}
    new = {}
    for part in parts:
        for r in read_csv(part):
            if r["id"] in new:
                raise SystemExit(f"{part}: {r['id']} is labelled twice")
            if r["id"] not in samples:
                raise SystemExit(f"{part}: {r['id']} is not in {out / 'samples.csv'}")
            new[r["id"]] = {**samples[r["id"]], **{k: r[k].strip() for k in LABEL_FIELDS}, "split": split_of(r["id"]),
                            "notes": r.get("notes", "").strip()}
    merged.update(new)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, SAMPLE_FIELDS + LABEL_FIELDS + ["split", "notes"], lineterminator="\n")
        w.writeheader()
        w.writerows(merged[i] for i in sorted(merged))
    print(f"{len(new)} labelled images merged; {len(merged)} in {path}", file=sys.stderr)


def calibration(sheet_dir: Path, zoom: int) -> None:
    """One sheet of world images (not model samples): each background with each attribute and none,
    every object class, named under each image. Viewed once before labelling."""
    from negstudy.shapes.world import PlacedObject, Scene

    rng = np.random.default_rng(0)
    objects = [(PlacedObject("ball", 8, 8, 11), PlacedObject("box", 23, 22, 11)),
               (PlacedObject("sun", 22, 8, 11), PlacedObject("tree", 9, 22, 12)),
               (PlacedObject("kite", 16, 16, 12),)]
    images, names = {}, []
    for b, background in enumerate(world.BACKGROUND_NAMES):
        for a, attribute in enumerate((None,) + world.ATTRIBUTES):
            scene = Scene(background, objects[(a + b) % len(objects)], attribute, (), False)
            key = f"{b}{a}"
            images[key] = world.render(scene, rng)[0]
            names.append(f"{key} {background} {attribute or 'none'}: {', '.join(o.name for o in scene.objects)}")
    sheets(images, sheet_dir, "calibration", len(world.ATTRIBUTES) + 1, len(world.BACKGROUND_NAMES), zoom)
    (sheet_dir / "calibration.txt").write_text("\n".join(names) + "\n")


def plan_plain(which: range, id_slice: slice) -> list[dict]:
    caps = captions(N_PLAIN_1 + N_PLAIN_2)
    return [{"id": i, "file": f"{i}.png", "caption": caps[c], "negative": "", "schedule": "never", "seed": str(SEED_BASE + c)}
            for i, c in zip(ids()[id_slice], which)]


def plan_edits(out: Path, labels_path: Path) -> list[dict]:
    """N_EDITS edits of labelled stage-1 samples: (sample, concept the labels see and the caption does not name)."""
    labels = {r["id"]: r for r in read_csv(labels_path)}
    stage1 = [r for r in read_csv(out / "samples.csv") if r["id"] in set(ids()[:N_PLAIN_1])]
    missing = [r["id"] for r in stage1 if r["id"] not in labels]
    if missing:
        raise SystemExit(f"--labels {labels_path}: stage-1 samples without labels: {', '.join(missing[:8])} ...")
    objects, attributes = [], []
    for r in stage1:
        lab, spec = labels[r["id"]], world.parse_caption(r["caption"])
        objects += [(r, o) for o in world.OBJECT_NAMES if lab[o] == "1" and o not in spec.objects]
        if lab["attribute"] in world.ATTRIBUTES and lab["attribute"] != spec.attribute:
            attributes.append((r, lab["attribute"]))
    rng = np.random.default_rng(ID_SEED + 1)
    objects = [objects[k] for k in rng.permutation(len(objects))]
    attributes = [attributes[k] for k in rng.permutation(len(attributes))]
    n_attr = min(ATTRIBUTE_EDITS, len(attributes))
    picks = attributes[:n_attr] + objects[: N_EDITS - n_attr]
    if not picks:
        raise SystemExit(f"--labels {labels_path}: no stage-1 sample shows an object or attribute its caption does not name")
    rows = []
    for k, i in enumerate(ids()[N_PLAIN_1 : N_PLAIN_1 + N_EDITS]):
        # starts cycle; with too few concepts the same ones come again, each time at the next start
        r, concept = picks[k % len(picks)]
        start = STARTS[(k + k // len(picks)) % len(STARTS)]
        rows.append({"id": i, "file": f"{i}.png", "caption": r["caption"], "negative": concept,
                     "schedule": f"from_step:{start}", "seed": r["seed"]})
    return rows


# A fresh, attribute-heavy set (tests/fixtures/fresh): made after the reader's rules were fixed, never
# tuned on (every id is holdout). Half the captions name an attribute and stop there; the other half
# also name that attribute as the negative from step 4, 8, 12 or 16 on (half-removed attributes, as
# in the main job's strips). Ids f000..f063 in a fixed random order.
N_FRESH, FRESH_SEED, FRESH_SEED_BASE = 64, 29, 140_000


def plan_fresh() -> list[dict]:
    rng = np.random.default_rng(FRESH_SEED)
    order = [f"f{k:03d}" for k in rng.permutation(N_FRESH)]
    rows = []
    for k in range(N_FRESH):
        wanted = world.ATTRIBUTES[k % len(world.ATTRIBUTES)]
        scene = world.sample_scene(rng, p_attribute=1.0, p_named_attribute=1.0)
        while scene.attribute != wanted:
            scene = world.sample_scene(rng, p_attribute=1.0, p_named_attribute=1.0)
        edit = (k // len(world.ATTRIBUTES)) % 2 == 1
        rows.append({"id": order[k], "file": f"{order[k]}.png", "caption": world.caption(scene),
                     "negative": wanted if edit else "", "seed": str(FRESH_SEED_BASE + k),
                     "schedule": f"from_step:{STARTS[1 + (k // 8) % 4]}" if edit else "never"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["plain", "plain2", "edits", "fresh", "sheets", "calibration", "merge"],
                    help="plain: stage 1; plain2 and edits: stage 2 (plain2 needs no labels); sheets: the unlabelled "
                         "samples; fresh: 64 attribute-heavy samples, all held out (use --out tests/fixtures/fresh); calibration: a "
                         "sheet of world images of every background and attribute; merge: the labellers' CSV files "
                         "(--parts) into OUT/labels.csv")
    ap.add_argument("--parts", type=Path, nargs="*", default=[], help="merge: the labellers' CSV files")
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/generated"))
    ap.add_argument("--labels", type=Path, default=None, help="labels of the stage-1 samples (default OUT/labels.csv)")
    ap.add_argument("--sheets", type=Path, default=Path("/tmp/reader_sheets"))
    ap.add_argument("--model", default="builtin:shapes")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--grid", default="4x4", help="images per sheet, columns x rows")
    ap.add_argument("--zoom", type=int, default=8)
    args = ap.parse_args()
    cols, rows_per = (int(v) for v in args.grid.split("x"))
    args.out.mkdir(parents=True, exist_ok=True)

    if args.stage == "merge":
        merge(args.out, args.parts)
        return
    if args.stage == "calibration":
        calibration(args.sheets, args.zoom)
        print(f"calibration sheet in {args.sheets}", file=sys.stderr)
        return
    if args.stage == "sheets":  # every sample not in the labels yet: stage 2's plain samples and edits mixed
        labels = args.labels or args.out / "labels.csv"
        done = {r["id"] for r in read_csv(labels)} if labels.exists() else set()
        images = {r["id"]: np.asarray(Image.open(args.out / r["file"]).convert("RGB"))
                  for r in read_csv(args.out / "samples.csv") if r["id"] not in done}
        sheets(images, args.sheets, "unlabelled", cols, rows_per, args.zoom)
        print(f"{len(images)} unlabelled samples on sheets in {args.sheets}", file=sys.stderr)
        return
    if args.stage == "plain":
        rows = plan_plain(range(N_PLAIN_1), slice(0, N_PLAIN_1))
    elif args.stage == "plain2":
        rows = plan_plain(range(N_PLAIN_1, N_PLAIN_1 + N_PLAIN_2), slice(N_PLAIN_1 + N_EDITS, N_TOTAL))
    elif args.stage == "fresh":
        rows = plan_fresh()
    else:
        rows = plan_edits(args.out, args.labels or args.out / "labels.csv")
    sampler = load_sampler(args.model, args.steps, args.guidance)
    start = time.perf_counter()
    images = generate(sampler, rows, args.batch_size)
    print(f"{len(rows)} images in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for r, image in zip(rows, images):
        Image.fromarray(image).save(args.out / r["file"], optimize=True)
    write_samples(args.out, rows)
    if args.stage in ("plain", "fresh"):  # stage 2 is drawn by `sheets` once both parts exist, so edits are not told apart
        sheets({r["id"]: im for r, im in zip(rows, images)}, args.sheets, "stage1" if args.stage == "plain" else "fresh",
               cols, rows_per, args.zoom)


if __name__ == "__main__":
    main()
