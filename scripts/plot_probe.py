"""Plot the quality probe of a shapes training run: each oracle rate against training minutes and steps.

    python scripts/plot_probe.py runs/shapes-cpu/probe.csv negstudy/models/shapes/probe.png
    python scripts/plot_probe.py runs/shapes-cpu/probe.csv out.png --baseline-json old_probe.json --markdown

The CSV is the one `scripts/train_shapes.py --probe-every-minutes M` writes (<out>/probe.csv, also
copied into the exported model directory). Each rate is drawn with its 95 % Wilson band; a
`--baseline-json` (rates of another model on the same probe, as written by `--probe-model`) is
drawn as dashed horizontal lines. `--markdown` also prints the curve as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

RATES = {"object_recall": "object recall", "background_right": "background right", "caption_exact": "caption-exact"}
# the issue-28 probes (train_shapes.py writes them since the probe grew them; older CSVs lack them)
TARGETS = {"attribute_blurry": "blurry drawn", "attribute_noisy": "noisy drawn", "attribute_dark": "dark drawn",
           "attribute_striped": "striped drawn", "broken_images": "broken images", "object_localization": "localization",
           "object_removal": "object removal", "object_named_kept": "named kept"}


def targets_of(df: pd.DataFrame) -> dict:
    return {k: v for k, v in TARGETS.items() if k in df.columns and df[k].notna().any()}


def markdown(df: pd.DataFrame) -> str:
    rates = RATES | targets_of(df)
    lines = ["| step | train min | images | " + " | ".join(rates.values()) + " |", "|---" * (3 + len(rates)) + "|"]
    for _, r in df.iterrows():
        cells = [f"{r[k]:.0%} [{r[k + '_lo']:.0%}, {r[k + '_hi']:.0%}]" if pd.notna(r[k]) else "-" for k in rates]
        lines.append(f"| {int(r['step'])} | {r['train_minutes']:.0f} | {int(r['images_seen']):,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: Path, baseline: dict | None = None, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = targets_of(df)
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(13 if extra else 7, 4), dpi=120, squeeze=False)
    ax = axes[0, 0]
    if extra:  # the issue-28 probes beside the quality curve, points only (their n is small: see probe.csv)
        bx = axes[0, 1]
        for key, label in extra.items():
            bx.plot(df["train_minutes"], df[key], marker="o", ms=3, label=label)
        bx.set_xlabel("training minutes (probe time excluded)")
        bx.set_ylabel("rate (oracle; n per column in probe.csv)")
        bx.set_ylim(0, 1)
        bx.grid(alpha=0.3)
        bx.legend(loc="best", fontsize=7)
    for (key, label), colour in zip(RATES.items(), ("tab:blue", "tab:green", "tab:red")):
        ax.plot(df["train_minutes"], df[key], marker="o", ms=3, color=colour, label=label)
        ax.fill_between(df["train_minutes"], df[key + "_lo"], df[key + "_hi"], color=colour, alpha=0.15, lw=0)
        if baseline and key in baseline:
            ax.axhline(baseline[key], color=colour, ls="--", lw=1)
    if baseline:
        ax.plot([], [], color="grey", ls="--", lw=1, label=baseline.get("label", "baseline"))
    ax.set_xlabel("training minutes (probe time excluded)")
    n = int(df["caption_exact_n"].iloc[0]) if "caption_exact_n" in df else int(df["probe_n"].iloc[0]) if "probe_n" in df else 128
    ax.set_ylabel(f"rate (oracle, n = {n} captions, 95 % Wilson)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    ticks = df["train_minutes"].iloc[:: max(1, len(df) // 6)]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{int(s)}" for s in df["step"].iloc[:: max(1, len(df) // 6)]], fontsize=8)
    top.set_xlabel("optimizer steps")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path, help="probe.csv of a training run")
    ap.add_argument("png", type=Path, help="the figure to write")
    ap.add_argument("--baseline-json", type=Path, help="another model's probe rates (dashed lines)")
    ap.add_argument("--title", default="")
    ap.add_argument("--markdown", action="store_true", help="also print the curve as a Markdown table")
    args = ap.parse_args(argv)
    if not args.csv.is_file():
        raise SystemExit(f"{args.csv}: no such probe CSV (train with --probe-every-minutes to write one)")
    df = pd.read_csv(args.csv)
    missing = [k for k in ["step", "train_minutes", "images_seen"] + [k + s for k in RATES for s in ("", "_lo", "_hi")]
               if k not in df.columns]
    if missing:
        raise SystemExit(f"{args.csv}: not a probe CSV (missing columns {', '.join(missing)})")
    baseline = json.loads(args.baseline_json.read_text()) if args.baseline_json else None
    plot(df, args.png, baseline, args.title)
    print(f"wrote {args.png} ({len(df)} probes)")
    if args.markdown:
        print(markdown(df))


if __name__ == "__main__":
    main()
