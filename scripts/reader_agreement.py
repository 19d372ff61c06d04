"""Agreement of the shapes-world readers with the by-eye labels of generated images.

    python scripts/reader_agreement.py                       # tests/fixtures/generated, markdown to stdout
    python scripts/reader_agreement.py --out agreement.md    # also writes agreement.md and agreement.json

Readers: the oracle (pixel rules with margins), the shapes CLIP (zero-shot with a margin) and the
default reader (their ensemble, negstudy.evaluators.ensemble). Per decision type (object
present/absent, background, attribute) and per split (tune: the rules were chosen on it;
holdout: never looked at while tuning): agreement with the labels with its Wilson 95 % interval
over the sure decisions, and the rate of "unsure" (left out of the agreement and counted).
Labels "unsure" are left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
READERS = ("oracle", "clip", "ensemble")


def measure(directory: Path, clip=None) -> dict:
    """{split: {reader: agreement dict}} over the labelled set in ``directory``."""
    from negstudy.evaluators import ensemble

    table, images = ensemble.load_labels(directory)
    if clip is None:
        from omegaconf import OmegaConf

        from negstudy.evaluators.clip import ClipEvaluator

        clip = ClipEvaluator.from_config(
            OmegaConf.create({"name": "clip", "path": "auto", "batch_size": 128, "local_files_only": True}), "shapes")
    o = ensemble.oracle_readings(images)
    c = ensemble.clip_readings(clip, images)
    readings = {"oracle": o, "clip": c, "ensemble": [ensemble.combine(a, b) for a, b in zip(o, c)]}
    out = {}
    for split in ("tune", "holdout"):
        keep = (table["split"] == split).to_numpy()
        sub = table[keep]
        out[split] = {name: ensemble.agreement(sub, [r for r, k in zip(rs, keep) if k]) for name, rs in readings.items()}
        out[split]["images"] = int(keep.sum())
    return out


def markdown(result: dict) -> str:
    lines = ["Agreement of the shapes-world readers with by-eye labels of generated images (tests/fixtures/generated;",
             "`python scripts/reader_agreement.py`). Agreement over the sure decisions, Wilson 95 % intervals;",
             "unsure decisions left out and counted; labels 'unsure' left out. Default reader: ensemble.", ""]
    for split in ("tune", "holdout"):
        lines += [f"### {split} split ({result[split]['images']} images)", "",
                  "| reader | decision | agreement | 95 % CI | sure n | unsure | unsure rate |", "|---|---|---|---|---|---|---|"]
        for name in READERS:
            for d, a in result[split][name].items():
                rate = "n/a" if a["n"] == 0 else f"{a['rate']:.1%}"
                ci = "" if a["n"] == 0 else f"{a['lo']:.1%} - {a['hi']:.1%}"
                ur = "n/a" if a["labelled"] == 0 else f"{a['unsure_rate']:.1%}"
                lines.append(f"| {name} | {d} | {rate} | {ci} | {a['n']} | {a['unsure']} | {ur} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default=str(REPO / "tests" / "fixtures" / "generated"),
                    help="directory with labels.csv and the PNGs it names")
    ap.add_argument("--out", help="also write this markdown file and a .json beside it")
    args = ap.parse_args()
    result = measure(Path(args.labels))
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
