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
        out[split]["per_attribute"] = {name: ensemble.attribute_agreement(sub, [r for r, k in zip(rs, keep) if k])
                                       for name, rs in readings.items()}
    second = directory / "second_labeller.csv"
    if second.exists():
        out["labellers"] = labellers(table, second)
    return out


def labellers(table, second_path: Path) -> dict:
    """Agreement of a second, independent labelling with labels.csv on the images both labelled:
    per decision type, over the decisions both labellers made surely (Wilson 95 %)."""
    import pandas as pd

    from negstudy.critical import wilson
    from negstudy.shapes import world

    second = pd.read_csv(second_path, dtype=str, keep_default_na=False).set_index("id")
    first = table.set_index("id").loc[second.index]
    kinds = {"object": list(world.OBJECT_NAMES), "background": ["background"], "attribute": ["attribute"]}
    out = {"images": int(len(second))}
    for kind, fields in kinds.items():
        a = first[fields].to_numpy().ravel()
        b = second[fields].to_numpy().ravel()
        sure = (a != "unsure") & (b != "unsure")
        agree = int((a[sure] == b[sure]).sum())
        rate, lo, hi = wilson(agree, int(sure.sum()))
        out[kind] = {"agree": agree, "n": int(sure.sum()), "either_unsure": int((~sure).sum()), "rate": rate, "lo": lo, "hi": hi}
    return out


def markdown(result: dict, labels: str = "tests/fixtures/generated") -> str:
    command = "python scripts/reader_agreement.py" + ("" if labels == "tests/fixtures/generated" else f" --labels {labels}")
    lines = [f"Agreement of the shapes-world readers with by-eye labels of generated images ({labels};",
             f"`{command}`). Agreement over the sure decisions, Wilson 95 % intervals;",
             "unsure decisions left out and counted; labels 'unsure' left out. Default reader: ensemble.", ""]
    for split in ("tune", "holdout"):
        if not result[split]["images"]:
            continue
        lines += [f"### {split} split ({result[split]['images']} images)", "",
                  "| reader | decision | agreement | 95 % CI | sure n | unsure | unsure rate |", "|---|---|---|---|---|---|---|"]
        for name in READERS:
            for d, a in result[split][name].items():
                rate = "n/a" if a["n"] == 0 else f"{a['rate']:.1%}"
                ci = "" if a["n"] == 0 else f"{a['lo']:.1%} - {a['hi']:.1%}"
                ur = "n/a" if a["labelled"] == 0 else f"{a['unsure_rate']:.1%}"
                lines.append(f"| {name} | {d} | {rate} | {ci} | {a['n']} | {a['unsure']} | {ur} |")
        lines.append("")
        per = result[split].get("per_attribute")
        if per:
            names = list(next(iter(per.values())))
            lines += [f"Attribute decisions by the label ({split}): agreement over the reader's sure answers (n); a label "
                      "the images rarely show rests on few decisions.", "",
                      "| reader | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for name in READERS:
                cells = [("n/a" if per[name][a]["n"] == 0 else f"{per[name][a]['rate']:.0%}") + f" ({per[name][a]['n']})"
                         for a in names]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    if "labellers" in result:
        lab = result["labellers"]
        lines += [f"### Two labellers ({lab['images']} images labelled twice, blind to each other)", "",
                  "| decision | agreement | 95 % CI | both sure | either unsure |", "|---|---|---|---|---|"]
        for d in ("object", "background", "attribute"):
            a = lab[d]
            lines.append(f"| {d} | {a['rate']:.1%} | {a['lo']:.1%} - {a['hi']:.1%} | {a['n']} | {a['either_unsure']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default=str(REPO / "tests" / "fixtures" / "generated"),
                    help="directory with labels.csv and the PNGs it names")
    ap.add_argument("--out", help="also write this markdown file and a .json beside it")
    args = ap.parse_args()
    result = measure(Path(args.labels))
    labels = Path(args.labels).resolve()
    text = markdown(result, str(labels.relative_to(REPO)) if labels.is_relative_to(REPO) else str(labels))
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
