"""report.html from a real (tiny) run of the main job, in a real headless Chromium."""

import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from negstudy import report, report_html

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = "/tmp/report.png"


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """`+sweep=critical_step` on tiny settings on the shipped model: a multirun over the overlay's two
    prompt shards, each job's tables, strips and word maps, and the pooled report."""
    tmp = tmp_path_factory.mktemp("main_job")
    out = tmp / "crit"
    # two pairs whose concept the shipped model draws unasked at 20 steps on seed 0 (scripts/screen_pairs.py
    # --steps 20: the sun on "a ball at night" and noise on "a sun at night" in 3 of 3 seeds), so each category
    # pools a seed where its concept was drawn
    pairs = '[{prompt:"a ball at night",negative:sun,category:object},{prompt:"a sun at night",negative:noisy,category:attribute}]'
    proc = subprocess.run(
        [sys.executable, "-m", "negstudy", "+sweep=critical_step", "steps=20", "sweep.screen_seeds=1", "sweep.max_seeds=1",
         "sweep.min_seeds=1", "sweep.stride=10", f"dataset.pairs={pairs}", f"hydra.sweep.dir={out}",
         "fixed_rows=0"],  # a few images: the overlay's 32-row blocks would be mostly padding
        capture_output=True, text=True, timeout=600, cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_main_job_end_to_end_on_the_shipped_model(main_job):
    """The multirun's tables, strips, word maps, pooled report and printed critical steps; W&B runs per job."""
    out, stdout = main_job
    assert f"sweep report -> {out / 'report' / 'report.html'}" in stdout
    pooled = stdout[stdout.index("sweep report ->"):]
    assert "critical step, object negatives:" in pooled and "critical step, attribute negatives:" in pooled
    ratio = pd.concat([pd.read_parquet(out / job / "ratio.parquet") for job in ("0", "1")])
    assert set(pd.read_parquet(out / "0" / "ratio.parquet").category) == {"object"}  # shard 0: the first pair
    assert set(ratio.category) == {"object", "attribute"} and ratio.step.max() == 20  # PNDM: 21 calls
    assert {"all_tokens", "word_tokens"} <= set(ratio.variant) and (ratio.ratio > 0).all()
    removal = pd.read_parquet(out / "0" / "removal.parquet")
    assert sorted(removal.start_step.unique()) == [0, 10, 20, 21]  # k = 21: never
    assert removal.present_without_negative.all() and not ratio.padding.any()  # both concepts drawn: no padding
    assert (out / "report" / "ratio_curves.png").stat().st_size > 5000
    crit = pd.read_csv(out / "report" / "critical_steps.csv")
    assert set(crit[crit.level == "category"].category) == {"object", "attribute"}
    maps = np.load(next((out / "0" / "maps").glob("*_s*.npz")))  # the attention grids' input, one per strip
    assert maps["positive"].shape == maps["negative"].shape and maps["negative"].shape[0] == 21
    assert str(maps["positive_word"]) == "ball" and np.isfinite(maps["negative"].astype(float)).all()
    from negstudy.tracking import read_offline_run  # W&B offline is the default logger

    run = read_offline_run(next((out / "0" / "wandb").glob("offline-run-*")))
    assert "critical_step/object" in run["summary"] and run["group"] == f"critical_step:{out}"
    assert [row["step"] for row in run["history"] if "ratio/object" in row] == list(range(21))
    strips = [row for row in run["history"] if row.get("image_strips/_type") == "table-file"]
    assert strips and strips[0]["image_strips/nrows"] == 1  # one (pair, seed) strip in shard 0


def open_report(path, widths=(1280, 800), screenshot=None):
    """Per viewport width: images (naturalWidth), page and viewport widths, figure ids, captions,
    tables, console errors; a full-page screenshot at the first width."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed for this test (bash scripts/setup.sh installs it)"
    seen = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        for width in widths:
            page = browser.new_page(viewport={"width": width, "height": 900})
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri())
            seen[width] = page.evaluate("""() => ({
                images: Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0),
                scroll: document.documentElement.scrollWidth, inner: window.innerWidth,
                figures: Array.from(document.querySelectorAll('figure')).map(f => f.id),
                captions: Array.from(document.querySelectorAll('figure')).map(f => (f.querySelector('figcaption') || {}).innerText || ''),
                tables: document.querySelectorAll('.tbl table').length,
                scorecard: !!document.getElementById('scorecard'),
                text: document.body.innerText})""")
            seen[width]["errors"] = errors
            if screenshot and width == widths[0]:
                page.screenshot(path=str(screenshot), full_page=True)
            page.close()
        browser.close()
    return seen


def test_report_of_the_main_job_renders_in_chromium(main_job):
    """Every image loads, nothing is wider than the window at 1280 and 800 px, the strips, the
    attention grids and the per-pair curves are there with captions, the scorecard when it exists."""
    out, _ = main_job
    seen = open_report(out / "report" / "report.html", screenshot=SCREENSHOT)
    for width, s in seen.items():
        assert s["images"] and all(w > 0 for w in s["images"]), (width, s["images"])
        assert s["scroll"] <= s["inner"], f"page {s['scroll']} px wide in a {s['inner']} px window"
        assert s["errors"] == []
    s = seen[1280]
    removal = (out / "report" / "removal_vs_start.csv").exists()  # only if a concept appeared without the negative
    for figure in ("strips", "attention_grid_0", "ratio", "ratio_pairs") + (("removal",) if removal else ()):
        assert figure in s["figures"], (figure, s["figures"])
    assert all(c.strip() and "n" in c for c in s["captions"])
    assert s["figures"].index("strips") < s["figures"].index("attention_grid_0") < s["figures"].index("ratio")
    assert s["tables"] == 1 + removal  # critical steps, removal against the start step (the scorecard aside)
    if importlib.util.find_spec("negstudy.scorecard") is not None:
        assert s["scorecard"], "negstudy.scorecard exists but the report has no scorecard"
    from PIL import Image

    pixels = np.asarray(Image.open(SCREENSHOT).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # not blank: text, axes, images drawn


def test_strip_tiles_and_verdicts_match_the_run(main_job):
    """The strip figure's rows are the run's strips cut at its start steps, labelled with removal.parquet's verdicts."""
    out, _ = main_job
    removal = report._read(out, "removal")
    html_text, rows = report_html.strips_section(out, out / "report", removal)
    assert "strips" in html_text and len(rows) == 2  # one pair per category in this run
    for row in rows:
        assert row["steps"] == [0, 10, 20, 21] and len(row["tiles"]) == 4
        assert all(t.shape == row["tiles"][0].shape for t in row["tiles"])
        g = removal[(removal.job == row["job"]) & (removal.pair == row["pair"]) & (removal.seed == row["seed"])]
        assert row["verdicts"] == {int(k): ("unsure" if pd.isna(v) else bool(v)) for k, v in zip(g.start_step, g.concept_present)}


def test_html_report_of_synthetic_tables_renders_in_chromium(tmp_path):
    """Tables only (no strips or maps on disk): the figures load, the tables show, nothing overflows."""
    from test_report import synthetic

    synthetic(tmp_path, np.random.default_rng(1))
    seen = open_report(report.build(tmp_path), widths=(1200, 800))
    for s in seen.values():
        assert len(s["images"]) == 3 and all(w > 400 for w in s["images"])  # per category, per pair, removal
        assert s["tables"] == 2 and s["scroll"] <= s["inner"] and s["errors"] == []
    assert "strips" not in seen[1200]["figures"]


def test_numbers_are_rounded_to_their_intervals():
    frame = pd.DataFrame({"category": ["object", "object"], "removed": [0.625, 0.5], "ci_low": [0.31, 0.47],
                          "ci_high": [0.86, 0.53], "peak": [1.0712, 1.0], "peak_low": [1.05, np.nan], "peak_high": [1.09, np.nan],
                          "psnr": [23.456, 30.0]})
    shown = report_html.display(frame)
    assert list(shown.columns) == ["category", "removed % (95 % CI)", "peak (95 % CI)", "psnr"]
    assert shown.iloc[0, 1] == "62\u00a0(31..86)" and shown.iloc[1, 1] == "50\u00a0(47..53)"
    assert shown.iloc[0, 2] == "1.07\u00a0(1.05..1.09)" and shown.iloc[1, 2] == "1.00"
    assert shown.psnr.tolist() == ["23.5", "30"]


def test_attention_grid_marks_the_step_where_the_negative_word_reaches_the_region(tmp_path):
    """Planted maps: the negative word's map is uniform until step 7, then sits on the region; the
    grid's hit is step 7 (lift >= 2), in the window that holds it; a map that never concentrates has none."""
    steps, size = 31, 16
    region = np.zeros((size, size), bool)
    region[4:8, 4:8] = True  # 1/16 of the image: a uniform map's lift is 1
    neg = np.ones((steps, size, size), np.float16)
    neg[7:, region] = 20.0  # from step 7: mass in region 320 / 560, lift 9.1
    pos = np.ones((steps, size, size), np.float16)
    common = {"positive": pos, "region": region, "prompt": np.array("a ball on the grass"),
              "negative_prompt": np.array("sun"), "positive_word": np.array("ball")}
    np.savez(tmp_path / "hit.npz", negative=neg, **common)
    fig, hit, window, has_region = report_html.grid_from_maps(tmp_path / "hit.npz", None, hit_lift=2.0)
    assert has_region
    assert hit == 7 and window == 5  # 31 steps in 7 windows of 5
    boxed = [ax for ax in fig.axes if ax.get_xlabel() == "hit at step 7"]
    assert len(boxed) == 1 and boxed[0].get_title() == ""  # the negative row's cell of window 5-9
    np.savez(tmp_path / "never.npz", negative=np.ones_like(neg), **common)
    assert report_html.grid_from_maps(tmp_path / "never.npz", None, hit_lift=2.0)[1] is None


def test_readme_figure_from_the_main_job_shows_the_scorecard_then_the_strips(main_job, tmp_path):
    """scripts/readme_figure.py on the run: the report rebuilt and seen by headless Chromium, at the
    asked width; the page it shoots keeps the scorecard compact (one table row per claim measured, the
    instrument checks folded) so that the strips come next."""
    import importlib.util as iu

    from PIL import Image

    out, _ = main_job
    from pathlib import Path

    spec = iu.spec_from_file_location("readme_figure", Path(__file__).parents[1] / "scripts" / "readme_figure.py")
    fig = iu.module_from_spec(spec)
    spec.loader.exec_module(fig)
    png = fig.from_run(out, tmp_path / "fig.png", 480)
    with Image.open(png) as im:
        assert im.width == 480 and im.height > 300
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 10  # drawn, not blank
    page = (out / "report" / "report.html").read_text()
    card = page.split("<table class='card'>")[1].split("</table>")[0]
    assert 1 <= card.count("<tr>") - 1 <= 4  # the ratio claims this run measured, not every claim
    assert page.index("<details class='how'>") < page.index("Image strips")
