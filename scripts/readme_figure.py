"""The README's picture of the report: docs/report.png.

    python scripts/readme_figure.py outputs/multirun/<date>/<time>     # the main job's pooled report
    python scripts/readme_figure.py --samples                           # the report's strip figure alone,
                                                                        # on the labelled samples of the shipped model

From a run (a job or a multirun directory): the top of ``report/report.html`` (the scorecard, then the
Figure 2 strips), as headless Chromium shows it in a 1280 px window, scaled to --width. The report is
rebuilt first (``negstudy.report.build``: tables and figures only, no model runs), so that it quotes
today's quality.json and reader_agreement.json.

``--samples`` draws no report page: it feeds the report's own Figure 2 renderer
(``negstudy.report_html.fig_strips``) with real samples of the shipped model from
``tests/fixtures/generated/`` (a caption and seed with a negative from step k, beside the same
caption and seed without it), labelled by the by-eye labels of that set instead of the reader's
verdicts. No model runs either way.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "report.png"
SAMPLES = REPO / "tests" / "fixtures" / "generated"
WINDOW = (1280, 1500)  # px: the page width the report is checked at, and about the scorecard plus the strips


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("readme_figure: error: no Chromium on PATH (scripts/setup.sh installs Debian's when it can)")


def from_run(run: Path, out: Path, width: int) -> Path:
    """Screenshot the top of the run's report.html (rebuilt first: the report a run wrote when it ended
    quotes the model's and the reader's files as they were then) into ``out``."""
    from PIL import Image

    from negstudy import report

    page = report.build(run)
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                        f"--screenshot={shot}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        with Image.open(shot) as im:
            im = im.convert("RGB")
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
            out.parent.mkdir(parents=True, exist_ok=True)
            im.quantize(256, dither=Image.Dither.NONE).save(out, optimize=True)  # a page: 256 colours keep the text, a third the bytes
    return out


def sample_rows(directory: Path = SAMPLES, per_start: int = 1) -> list[dict]:
    """Rows for ``fig_strips``: object negatives whose object the labels see in the plain sample,
    ``per_start`` per start step k, each [negative from step k, no negative] with the labels' verdicts."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    labels = pd.read_csv(directory / "labels.csv", dtype=str)
    plain = labels[labels.schedule == "never"].set_index(["caption", "seed"])
    objects = {"ball", "sun", "box", "tree", "kite"}
    verdict = {"1": True, "0": False}
    rows = []
    edits = labels[(labels.schedule != "never") & labels.negative.isin(objects)].sort_values("id")
    for _, e in edits.iterrows():
        k = int(e.schedule.split(":")[1])
        if (e.caption, e.seed) not in plain.index or sum(r["steps"][0] == k for r in rows) >= per_start:
            continue
        p = plain.loc[(e.caption, e.seed)]
        if p[e.negative] != "1":
            continue  # the concept must be there without the negative
        tiles = [np.asarray(Image.open(directory / f).convert("RGB")) for f in (e.file, p.file)]
        rows.append({"prompt": e.caption, "negative": e.negative, "seed": int(e.seed), "steps": [k, 31], "tiles": tiles,
                     "verdicts": {k: verdict.get(e[e.negative], "unsure"), 31: True}})
    return sorted(rows, key=lambda r: r["steps"][0])


def from_samples(out: Path, width: int) -> Path:
    from io import BytesIO

    from PIL import Image

    from negstudy.report_html import fig_strips

    fig = fig_strips(sample_rows())  # its title and labels as in the report; the verdicts here are by eye
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=160)
    with Image.open(buf) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        out.parent.mkdir(parents=True, exist_ok=True)
        im.save(out, optimize=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", type=Path, help="a job or multirun directory of python -m negstudy")
    ap.add_argument("--samples", action="store_true", help="the strip figure from tests/fixtures/generated instead")
    ap.add_argument("--out", type=Path, default=OUT, help=f"the PNG to write (default {OUT.relative_to(REPO)})")
    ap.add_argument("--width", type=int, default=960, help="width of the PNG in px")
    args = ap.parse_args(argv)
    if (args.run is None) == (not args.samples):
        ap.error("give a run directory or --samples")
    if args.run is not None and not args.run.is_dir():
        ap.error(f"{args.run}: not a directory")
    path = from_samples(args.out, args.width) if args.samples else from_run(args.run, args.out, args.width)
    print(f"readme_figure: {path}")


if __name__ == "__main__":
    main()
