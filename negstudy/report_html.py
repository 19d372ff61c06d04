"""report.html: the paper's figures from what the jobs wrote, each with a one-line caption.

:func:`page` is called by :func:`negstudy.report.build` once the tables are computed. In order:
the replication scorecard (when :mod:`negstudy.scorecard` or a ``scorecard.md`` exists), Figure 2
style image strips (the same seed with the negative from every start step k, and the reader's
verdict under each image), Figure 1/4 style attention grids (the positive and the negative word's
maps per step window, the window where the negative word's map first concentrates on the
concept's region boxed), the strength-ratio curves per category and per pair (small multiples),
removal against the start step, reverse activation, the mechanism plots, the removal benchmark
with example triples, then any other figure a study drew. Everything is embedded (data URIs): the
page is one offline file. Tables sit in boxes that scroll sideways rather than widen the page;
each estimate is shown with its interval, rounded to the interval's first significant digit.
"""

from __future__ import annotations

import ast
import base64
import html
import io
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

STRIP_PAIRS_PER_CATEGORY = 2  # image strips per category (distinct pairs)
GRIDS_PER_CATEGORY = {"object": 2, "attribute": 1}
GRID_WINDOWS = 7  # columns of an attention grid (step windows)
PAIR_PANELS = 16  # small multiples of the per-pair ratio curves, at most
log = logging.getLogger("negstudy")
MECHANISM_PLOTS = ("inducing", "momentum", "neutralization", "energy", "attention_grid")

CSS = """
body{font-family:system-ui,sans-serif;max-width:64rem;margin:1.5rem auto;padding:0 1rem;line-height:1.4;color:#222}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
figure{margin:1rem 0 1.6rem}figure img{display:block;max-width:100%;height:auto}
figcaption{font-size:.85rem;color:#444;margin-top:.3rem}
.tbl{overflow-x:auto;max-width:100%;margin:.6rem 0 1.4rem}
table{border-collapse:collapse;font-size:.82rem}td,th{border:1px solid #ccc;padding:.15rem .4rem;vertical-align:top}
th{background:#f4f4f4;text-align:left}
.scorecard{border:2px solid #888;border-radius:6px;padding:.4rem 1rem;margin:1rem 0;overflow-x:auto;max-width:100%;box-sizing:border-box}
.scorecard h2{margin-top:.6rem}.scorecard pre{white-space:pre-wrap;overflow-wrap:anywhere}
.scorecard table{width:100%}.scorecard td{overflow-wrap:anywhere}.scorecard th.claim{width:28%}.scorecard th.verdict{width:28%}.scorecard th.n{width:9%}
.scorecard details summary{cursor:pointer;color:#555;font-size:.8rem}.scorecard details.how{margin:.6rem 0}.scorecard details.how summary{font-size:.9rem}
p,li{overflow-wrap:anywhere}
"""


# ----------------------------------------------------------------------------- helpers


def png_b64(fig: Figure, path: Path | None = None, dpi: int = 110) -> str:
    """The figure as base64 PNG (and written to ``path`` when given)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    if path is not None:
        Path(path).write_bytes(buf.getvalue())
    return base64.b64encode(buf.getvalue()).decode()


def decimals(low, high, default: int = 2) -> int:
    """Decimals that an interval justifies: down to the first significant digit of its width
    (``default`` for a zero-width or open interval)."""
    try:
        width = float(high) - float(low)
    except (TypeError, ValueError):
        return default
    if not np.isfinite(width) or width <= 0:
        return default
    return int(min(4, max(0, -math.floor(math.log10(width)))))


RATES = {"removed", "appears", "preferred", "substituted", "background_identical", "never_fraction",
         "critical_from_attention", "vs_from0"}  # shares, shown in per cent


def _num(x, d: int, scale: float = 1.0) -> str:
    return "-" if x is None or pd.isna(x) else ("inf" if np.isinf(x) else f"{x * scale:.{d}f}")


def display(frame: pd.DataFrame) -> pd.DataFrame:
    """A table as shown: ``x`` with ``x_low``/``x_high`` (or the column before ``ci_low``/``ci_high``)
    becomes one cell "x (low..high)" rounded to what the interval justifies; other floats to 3
    significant digits; columns without any value dropped."""
    frame = frame.dropna(axis=1, how="all").copy()
    pairs = {}
    cols = list(frame.columns)
    if "ci_low" in frame and "ci_high" in frame:
        before = [c for c in cols[: cols.index("ci_low")] if pd.api.types.is_numeric_dtype(frame[c])]
        if before:
            pairs[before[-1]] = ("ci_low", "ci_high")
    for c in cols:
        if f"{c}_low" in frame and f"{c}_high" in frame and pd.api.types.is_numeric_dtype(frame[c]):
            pairs[c] = (f"{c}_low", f"{c}_high")
    for c, (lo, hi) in pairs.items():
        scale = 100.0 if c in RATES else 1.0
        cells = []
        for v, a, b in zip(frame[c], frame[lo], frame[hi]):
            d = decimals(a * scale, b * scale, default=0 if scale == 100 else 2) if pd.notna(a) and pd.notna(b) else 2
            cells.append(_num(v, d, scale) if pd.isna(a) and pd.isna(b)
                         else f"{_num(v, d, scale)}\u00a0({_num(a, d, scale)}..{_num(b, d, scale)})")
        frame[c] = cells
        frame = frame.rename(columns={c: f"{c} {'% ' if scale == 100 else ''}(95 % CI)"}).drop(columns=[lo, hi])
    for c in frame.columns:
        if pd.api.types.is_float_dtype(frame[c]):
            if c in RATES:
                frame[c] = [("-" if pd.isna(v) else f"{100 * v:.0f} %") for v in frame[c]]
            else:
                frame[c] = [("-" if pd.isna(v) else f"{v:.3g}") for v in frame[c]]
    return frame.rename(columns=lambda c: str(c).replace("_", " "))  # headers may wrap


def table_html(frame: pd.DataFrame) -> str:
    return f"<div class='tbl'>{display(frame).to_html(index=False, na_rep='-', border=0)}</div>"


def figure_html(key: str, b64: str, caption: str) -> str:
    return (f"<figure id='{html.escape(key)}'><img alt='{html.escape(key)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _literal(text, default):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError):
        return default


def _units(removal: pd.DataFrame) -> pd.DataFrame:
    """One row per (job, pair, seed) of the critical-step study: present without the negative,
    removed with the negative from step 0, and back for some later start step."""
    rows = []
    for (job, pair, seed), g in removal.groupby(["job", "pair", "seed"], sort=True):
        g = g.sort_values("start_step")
        present = g.concept_present.fillna(False).astype(bool).to_numpy()  # unsure: not counted as present
        rows.append({"job": job, "pair": pair, "seed": seed, "prompt": g.prompt.iloc[0] if "prompt" in g else "",
                     "negative": g.negative.iloc[0], "category": g.category.iloc[0],
                     "plain": bool(g.present_without_negative.iloc[0]), "removed_at_0": not present[0],
                     "returns": bool(present[1:-1].any()) if len(present) > 2 else False})
    return pd.DataFrame(rows)


def choose_units(removal: pd.DataFrame, per_category: dict | int) -> pd.DataFrame:
    """A few (job, pair, seed) per category, distinct pairs first: those where the concept appears
    without the negative, the negative from step 0 removes it, and a late start lets it back come first."""
    if removal.empty:
        return pd.DataFrame()
    units = _units(removal)
    units["score"] = units.plain.astype(int) * 4 + units.removed_at_0.astype(int) * 2 + units.returns.astype(int)
    chosen = []
    for category, g in sorted(units.groupby("category"), key=lambda kv: kv[0] != "object"):  # objects first
        want = per_category.get(category, 1) if isinstance(per_category, dict) else per_category
        g = g.sort_values(["score", "job", "pair", "seed"], ascending=[False, True, True, True])
        first = g.drop_duplicates(["job", "pair"])  # one seed per pair, the best
        chosen.append(first.head(want))
    return pd.concat(chosen, ignore_index=True) if chosen else pd.DataFrame()


def strip_index(root: Path) -> dict:
    """(job, prompt, negative, seed) -> path of the critical-step study's strip PNGs (they carry start_steps)."""
    from PIL import Image

    index = {}
    for path in sorted(root.rglob("strips/*.png")):
        rel = path.parent.parent.relative_to(root)
        if "report" in rel.parts:
            continue
        with Image.open(path) as im:
            info = dict(im.info)
        if "start_steps" not in info:
            continue
        index[(str(rel), info.get("prompt"), info.get("negative"), str(info.get("seed")))] = path
    return index


def load_strip(path: Path) -> tuple[list[int], list[np.ndarray]]:
    """A strip PNG -> its start steps and one (H, W, 3) uint8 image per start step."""
    from PIL import Image

    with Image.open(path) as im:
        steps = _literal(im.info.get("start_steps"), [])
        arr = np.asarray(im.convert("RGB"))
    width = arr.shape[1] // max(1, len(steps))
    return list(steps), [arr[:, i * width:(i + 1) * width] for i in range(len(steps))]


# ----------------------------------------------------------------------------- Figure 2: strips


def fig_strips(rows: list[dict]) -> Figure:
    """rows: dicts with prompt, negative, seed, steps, tiles, verdicts (True = concept present)."""
    cols = max(len(r["steps"]) for r in rows)
    fig = Figure(figsize=(max(6.5, 0.78 * cols + 1.6), 1.05 * len(rows) + 0.5))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, row in enumerate(rows):
        last = len(row["steps"]) - 1
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(row["steps"]):
                ax.axis("off")
                continue
            ax.imshow(row["tiles"][c], interpolation="nearest")
            k = row["steps"][c]
            ax.set_title("no negative" if c == last else f"k={k}", fontsize=7, pad=2)
            verdict = row["verdicts"].get(k)
            if verdict == "unsure":
                ax.set_xlabel("unsure", fontsize=7, labelpad=2, color="tab:gray")
            elif verdict is not None:
                ax.set_xlabel("present" if verdict else "absent", fontsize=7, labelpad=2,
                              color="tab:red" if verdict else "tab:green")
            for spine in ax.spines.values():
                spine.set_color("black" if c == last else "#bbb")
        axes[r, 0].set_ylabel(f"'{row['prompt']}'\nneg. '{row['negative']}', seed {row['seed']}", fontsize=7,
                              rotation=0, ha="right", va="center")
    fig.suptitle("negative from step k on (k=0: usual negative prompting); below: is the negative's concept there?",
                 fontsize=8)
    fig.tight_layout(pad=0.4, h_pad=0.6, w_pad=0.2)
    return fig


def strips_section(root: Path, out: Path, removal: pd.DataFrame) -> tuple[str, list[dict]]:
    if removal.empty or "start_step" not in removal:
        return "", []
    chosen = choose_units(removal, STRIP_PAIRS_PER_CATEGORY)
    index = strip_index(root)
    rows = []
    for u in chosen.itertuples():
        path = index.get((str(u.job), u.prompt, u.negative, str(u.seed)))
        if path is None:
            continue
        steps, tiles = load_strip(path)
        g = removal[(removal.job == u.job) & (removal.pair == u.pair) & (removal.seed == u.seed)]
        verdicts = {int(k): ("unsure" if pd.isna(v) else bool(v)) for k, v in zip(g.start_step, g.concept_present)}
        rows.append({"prompt": u.prompt, "negative": u.negative, "seed": u.seed, "category": u.category, "steps": steps,
                     "tiles": tiles, "verdicts": verdicts, "path": path, "plain": u.plain, "job": u.job, "pair": u.pair})
    if not rows:
        return "", []
    b64 = png_b64(fig_strips(rows), out / "strips.png")
    n_units = removal[["job", "pair", "seed"]].drop_duplicates().shape[0]
    shown = sum(r["plain"] for r in rows)
    caption = (f"Figure 2 style: {len(rows)} of {n_units} pair-seeds, one per pair, at most {STRIP_PAIRS_PER_CATEGORY} per "
               f"category ({shown} of them show the concept without the negative), chosen for showing the concept without the "
               "negative, its removal by the negative from step 0 and its return under a late start; each row is one seed "
               "generated with the negative from start step k and without it (last image); under each image the shapes "
               "oracle's verdict on the negative's concept (the verdicts of removal.parquet).")
    return "<h2>Image strips: the negative from each start step</h2>" + figure_html("strips", b64, caption), rows


# ----------------------------------------------------------------------------- Figures 1/4: attention grids


def grid_from_maps(npz: Path, plain_image: np.ndarray | None, hit_lift: float, windows_wanted: int = GRID_WINDOWS):
    """An attention grid from a ``maps/*.npz`` of the critical-step study (negstudy.figures.save_word_maps).

    Returns (figure, hit step or None, window length, whether there is a region)."""
    from negstudy.critical import maps_hit_step
    from negstudy.figures import fig_attention_grid, step_windows

    data = np.load(npz)
    pos, neg = data["positive"].astype(np.float32), data["negative"].astype(np.float32)
    region = data["region"] if data["region"].size else None
    n = neg.shape[0]
    window = max(1, math.ceil(n / windows_wanted))
    windows = step_windows(n, window)
    hit = maps_hit_step(neg, region, hit_lift)  # the attention hit rule (negstudy.critical)
    hit_window = None if hit is None else next(i for i, (a, b) in enumerate(windows) if a <= hit <= b)
    image = plain_image
    if image is not None and region is not None and image.shape[:2] != region.shape:
        from PIL import Image

        image = np.asarray(Image.fromarray(image).resize(region.shape[::-1], Image.NEAREST))
    word, negative, prompt = str(data["positive_word"]), str(data["negative_prompt"]), str(data["prompt"])
    where = ("concept's region outlined" if region is not None else "no region (attribute, or the concept is absent)")
    verdict = (f"the negative word's map first puts >= {hit_lift:g}x a uniform map's mass on the region at step {hit} (boxed)"
               if hit is not None else (f"the negative word's map never reaches {hit_lift:g}x a uniform map's mass on the region"
                                        if region is not None else ""))
    fig = fig_attention_grid(pos, neg, windows, hit_window, image=image, words=(word, negative), region=region,
                             title=f"'{prompt}', negative '{negative}': image without the negative, {where}\n{verdict}",
                             hit_label=f"hit at step {hit}")
    return fig, hit, window, region is not None


def attention_section(root: Path, out: Path, removal: pd.DataFrame, strip_rows: list[dict], study_grids: dict,
                      hit_lift: float) -> str:
    parts = []
    chosen = choose_units(removal, GRIDS_PER_CATEGORY) if not removal.empty and "start_step" in removal else pd.DataFrame()
    strips = {(str(r["job"]), r["pair"], r["seed"]): r for r in strip_rows}
    index = strip_index(root) if len(chosen) else {}
    n_maps = sum(1 for _ in root.rglob("maps/*.npz"))
    for i, u in enumerate(chosen.itertuples() if len(chosen) else []):
        path = index.get((str(u.job), u.prompt, u.negative, str(u.seed)))
        if path is None:
            continue
        npz = path.parent.parent / "maps" / (path.stem + ".npz")
        if not npz.exists():
            continue
        row = strips.get((str(u.job), u.pair, u.seed))
        plain = row["tiles"][-1] if row else load_strip(path)[1][-1]
        fig, hit, window, has_region = grid_from_maps(npz, plain, hit_lift)
        found = (f"hit = first step with lift >= {hit_lift:g}: {'step ' + str(hit) if hit is not None else 'none'}"
                 if has_region else "no region (an attribute, or the concept is absent without the negative): no hit")
        b64 = png_b64(fig, out / f"attention_grid_{i}.png")
        parts.append(figure_html(f"attention_grid_{i}", b64,
                                 f"Figure 1/4 style, one pair-seed (of {n_maps} with maps): '{u.prompt}' with negative "
                                 f"'{u.negative}', seed {u.seed}, the negative at every step; each column the mean over a "
                                 f"window of {window} steps of the positive word's map (positive branch) and the negative "
                                 "word's map (negative branch), each row on one colour scale; region = the shapes oracle's mask "
                                 f"in the image without the negative; lift = the map's mass in the region / the region's share "
                                 f"of the image; {found}."))
    for key, b64 in study_grids.items():
        parts.append(figure_html(key.replace("/", "_"), b64,
                                 f"Attention grid of the attention-maps study ({key}): one prompt, negative and seed; columns "
                                 "= step windows, rows = positive word (positive branch) and negative word (negative branch); "
                                 "boxed: first window whose negative-branch mass in the object's region is >= 0.5."))
    return "<h2>Attention maps per step window</h2>" + "".join(parts) if parts else ""


# ----------------------------------------------------------------------------- removal examples


def fig_examples(root: Path, targets: pd.DataFrame, n: int = 6) -> Figure | None:
    """Rows of original | negative from 0 | fixed window | adaptive window (the removal study's
    ``triples/*.png``), objects the adaptive window removed first; each image labelled with the
    method's step window and the reader's verdict."""
    from PIL import Image

    from negstudy.records import strip_name

    t = targets.assign(_adaptive_removed=(targets.method == "adaptive") & (targets.removed == True))  # noqa: E712 (nullable)
    order = (t.groupby(["job", "caption", "prompt", "seed", "object"], sort=False)._adaptive_removed.any()
             .sort_values(ascending=False, kind="stable"))
    rows = []
    for (job, caption, prompt, seed, obj), _ in order.items():
        path = root / job / "triples" / strip_name(caption, prompt, seed, obj)
        if path.exists():
            rows.append((path, t[(t.job == job) & (t.caption == caption) & (t.seed == seed) & (t.object == obj)]))
        if len(rows) == n:
            break
    if not rows:
        return None
    methods = ["from0", "window", "adaptive"]
    names = {"from0": "negative from 0", "window": "fixed window", "adaptive": "adaptive window"}
    fig = Figure(figsize=(7.5, 1.55 * len(rows) + 0.3))
    axes = fig.subplots(len(rows), 4, squeeze=False)
    for r, (path, g) in enumerate(rows):
        with Image.open(path) as im:
            info, arr = dict(im.info), np.asarray(im.convert("RGB"))
        w = arr.shape[1] // 4
        for c in range(4):
            ax = axes[r, c]
            ax.imshow(arr[:, c * w:(c + 1) * w], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_title("original", fontsize=7, pad=2)
                ax.set_ylabel(f"'{info.get('prompt', '')}'\nseed {info.get('seed', '')}, remove '{info.get('object', '')}'",
                              fontsize=7, rotation=0, ha="right", va="center")
                continue
            m = methods[c - 1]
            ax.set_title(f"{names[m]} ({info.get(f'{m}_window', '?')})", fontsize=7, pad=2)
            verdict = g[g.method == m].removed
            if len(verdict) and pd.notna(verdict.iloc[0]):
                gone = bool(verdict.iloc[0])
                ax.set_xlabel("removed" if gone else "still there", fontsize=7, labelpad=2,
                              color="tab:green" if gone else "tab:red")
    fig.tight_layout(pad=0.4, h_pad=0.5, w_pad=0.3)
    return fig


# ----------------------------------------------------------------------------- ratio curves per pair


def _with_prompt(ratio: pd.DataFrame, screen: pd.DataFrame) -> pd.DataFrame:
    if "prompt" in ratio or screen.empty or "prompt" not in screen:
        return ratio
    return ratio.merge(screen[["job", "pair", "prompt"]].drop_duplicates(["job", "pair"]), on=["job", "pair"], how="left")


def fig_pair_curves(ratio: pd.DataFrame, crit: pd.DataFrame, variant: str) -> tuple[Figure, int, int] | None:
    """Small multiples: per prompt pair, the mean ratio over its seeds with a 95 % bootstrap band
    and its critical step (dashed). Returns (figure, pairs shown, pairs)."""
    from negstudy.critical import bootstrap_ci

    r = ratio[ratio.variant == variant]
    if r.empty:
        return None
    r = r.assign(label=(r.prompt.astype(str) + " | " if "prompt" in r else r.job.astype(str) + ":" + r.pair.astype(str) + " | ")
                 + r.negative.astype(str))
    labels = list(r.sort_values(["category", "label"], ascending=[False, True]).label.drop_duplicates())
    shown = labels[:PAIR_PANELS]
    ncols = min(4, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = Figure(figsize=(2.6 * ncols + 0.4, 1.9 * nrows + 0.5))
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True))
    pairs = crit[crit.level == "pair"] if len(crit) and "level" in crit else pd.DataFrame()
    for ax, label in zip(axes.flat, shown):
        g = r[r.label == label]
        values = g.pivot_table(index=["job", "pair", "seed"], columns="step", values="ratio").to_numpy()
        mean, lo, hi = bootstrap_ci(values)
        steps = np.arange(len(mean))
        colour = "tab:orange" if g.category.iloc[0] == "object" else "tab:blue"  # as in the per-category figure
        ax.plot(steps, mean, color=colour, lw=1.2)
        if values.shape[0] > 1:
            ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, lw=0)
        ax.axhline(1.0, color="grey", lw=0.6)
        row = pairs[(pairs.negative == g.negative.iloc[0]) & (pairs.category == g.category.iloc[0])] if len(pairs) else pairs
        if len(row) > 1 and "prompt" in row and "prompt" in g:
            row = row[row.prompt == g.prompt.iloc[0]]
        step = row.critical_step.iloc[0] if len(row) == 1 else None
        if step is not None and pd.notna(step):
            ax.axvline(step, color=colour, ls="--", lw=1)
        prompt, _, negative = label.rpartition(" | ")
        ax.set_title(f"'{prompt}'\nneg. '{negative}' ({g.category.iloc[0]}), n={values.shape[0]}"
                     + (f", crit. {int(step)}" if step is not None and pd.notna(step) else ""), fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("ratio neg/pos", fontsize=7)
    fig.tight_layout(pad=0.4)
    return fig, len(shown), len(labels)


# ----------------------------------------------------------------------------- scorecard hook


def scorecard_html(root: Path, out: Path, variant: str) -> str:
    """The replication scorecard, when there is one: :func:`negstudy.scorecard.write` (writes
    ``scorecard.md`` / ``scorecard.csv`` beside the report and returns its HTML fragment), else a
    ``scorecard.html`` / ``scorecard.md`` found beside the report or in the run directory. Empty
    when none exists; a scorecard that fails shows its error in its box instead of failing the report."""
    try:
        from negstudy import scorecard
    except ImportError:
        scorecard = None
    fragment = ""
    if scorecard is not None:
        fn = getattr(scorecard, "write", None) or getattr(scorecard, "scorecard_html", None)
        try:
            fragment = fn(root, out, variant=variant) if fn is getattr(scorecard, "write", None) else fn(root, variant=variant)
        except Exception as err:  # noqa: BLE001 (the figures below do not depend on it)
            log.warning("scorecard failed: %r", err)
            fragment = f"<h2>Replication scorecard</h2><p>The scorecard could not be computed: {html.escape(repr(err))}</p>"
    if not fragment:
        for where in (out, root):
            if (where / "scorecard.html").exists():
                fragment = (where / "scorecard.html").read_text()
                break
            if (where / "scorecard.md").exists():
                fragment = f"<h2>Replication scorecard</h2><pre>{html.escape((where / 'scorecard.md').read_text())}</pre>"
                break
    return _scorecard_box(fragment)


def _scorecard_box(fragment: str) -> str:
    """The scorecard's fragment in a bordered box that scrolls sideways if it must; id 'scorecard'."""
    if not fragment:
        return ""
    ident = "" if "id='scorecard'" in fragment or 'id="scorecard"' in fragment else " id='scorecard'"
    return f"<div class='scorecard'{ident}>{fragment}</div>"


# ----------------------------------------------------------------------------- the page


def _n_text(frame: pd.DataFrame) -> str:
    """'n = 3 pairs x 7 pair-seeds (object), ...' from a table with n_pairs / n_pair_seeds (or n) per row."""
    if frame.empty:
        return "n = 0"
    parts = []
    by = "category" if "category" in frame else None
    for key, g in (frame.groupby(by) if by else [("", frame)]):
        if "n_pair_seeds" in g:
            parts.append(f"{int(g.n_pairs.max())} pairs x {int(g.n_pair_seeds.max())} pair-seeds" + (f" ({key})" if key else ""))
        elif "n" in g:
            parts.append(f"{int(g.n.max())} pair-seeds" + (f" ({key})" if key else ""))
    return "n = " + ", ".join(parts) + " per point" if parts else ""


def page(root: Path, out: Path, intro: str, sections: list[tuple[str, pd.DataFrame]], figures: dict[str, str], *,
         variant: str, hit_lift: float, ratio: pd.DataFrame | None = None, removal: pd.DataFrame | None = None,
         crit: pd.DataFrame | None = None, screen: pd.DataFrame | None = None, scorecard: str | None = None) -> str:
    """The whole report.html. sections: (title, table) from build; figures: key -> base64 PNG, the
    keys build uses ("ratio", "removal", "reverse", "removal_methods", "removal_examples") and the
    studies' own PNGs keyed by their path below ``root`` without suffix. scorecard: the scorecard's
    HTML fragment when the caller already has it (else :func:`scorecard_html` looks for one)."""
    root, out = Path(root), Path(out)
    ratio, removal, crit, screen = (frame if frame is not None else pd.DataFrame() for frame in (ratio, removal, crit, screen))
    tables = dict(sections)

    def table(prefix: str) -> pd.DataFrame | None:
        return next((f for t, f in tables.items() if t.startswith(prefix)), None)

    used_tables: set[str] = set()
    body = [scorecard_html(root, out, variant) if scorecard is None else _scorecard_box(scorecard)]
    strips_html, strip_rows = strips_section(root, out, removal)
    body.append(strips_html)
    study = {k: v for k, v in figures.items() if "/" in k or k in MECHANISM_PLOTS}
    grids = {k: v for k, v in study.items() if "grids/" in k or k.startswith("grids")}
    body.append(attention_section(root, out, removal, strip_rows, grids, hit_lift))

    ratio_parts = []
    if "ratio" in figures:
        ratio_parts.append(figure_html("ratio", figures["ratio"],
                                       f"Strength ratio per category ({variant}): mean over pair-seeds of the per-step ratio "
                                       "of the negative branch's cross-attention statistic to the positive branch's (negative "
                                       "from step 0), 95 % bootstrap band resampling pairs then seeds; dashed: the critical step "
                                       f"(object: peak, attribute: stays >= 1); {_n_text(crit[crit.level == 'category']) if len(crit) else ''}."))
    if not ratio.empty:
        made = fig_pair_curves(_with_prompt(ratio, screen), crit, variant)
        if made is not None:
            fig, shown, total = made
            ratio_parts.append(figure_html("ratio_pairs", png_b64(fig, out / "ratio_curves_per_pair.png"),
                                           f"Strength ratio per pair, {shown} of {total} pairs ({variant}; orange: object, blue: "
                                           "attribute negatives): mean over the pair's seeds (n in each title), 95 % bootstrap band "
                                           "over seeds; dashed: the pair's critical step."))
    crit_table = table("Critical steps")
    if crit_table is not None:
        used_tables.add("Critical steps")
        ratio_parts.append(table_html(crit_table))
    if ratio_parts:
        body.append("<h2>Strength of the negative prompt and critical steps</h2>" + "".join(ratio_parts))

    def rate_section(heading: str, key: str, title: str, caption: str) -> None:
        found = table(title)
        if key not in figures and found is None:
            return
        parts = [f"<h2>{heading}</h2>"]
        if key in figures:
            parts.append(figure_html(key, figures[key], f"{caption}; 95 % intervals (pairs, then seeds); "
                                                        f"{_n_text(found) if found is not None else ''}."))
        if found is not None:
            used_tables.add(title)
            parts.append(table_html(found))
        body.append("".join(parts))

    rate_section("Removal against the start step", "removal", "Removal against start step",
                 "Share of pair-seeds whose concept is absent (the study's reader; unsure images left out and counted) "
                 "when the negative starts at step k, over pair-seeds where it appears without the negative")
    rate_section("Reverse activation", "reverse", "Reverse activation",
                 "Share of pair-seeds in which the negative's object appears when the negative acts in steps 0..k-1 only, "
                 "over pair-seeds where it is absent without the negative (k=0)")

    mech = {k: v for k, v in study.items() if Path(k).name in MECHANISM_PLOTS}
    if mech:
        parts = ["<h2>Mechanisms</h2>"]
        for key, b64 in mech.items():
            parts.append(figure_html(key.replace("/", "_"), b64, _mechanism_caption(root, key)))
        body.append("".join(parts))

    methods = table("Object removal")
    if methods is not None or "removal_methods" in figures:
        parts = ["<h2>Object removal: negative from step 0, fixed window, adaptive window</h2>"]
        if methods is not None:
            used_tables.add(next(t for t in tables if t.startswith("Object removal")))
            parts.append(table_html(methods))
        if "removal_methods" in figures:
            n = ", ".join(f"{d}: {int(g.objects.max())} objects" for d, g in methods.groupby("dataset")) if methods is not None else ""
            parts.append(figure_html("removal_methods", figures["removal_methods"],
                                     f"Removal rate and PSNR outside the object per method ({n}); objects judged under every "
                                     "method; 95 % intervals resample captions then objects."))
        if "removal_examples" in figures:
            parts.append(figure_html("removal_examples", figures["removal_examples"],
                                     "Examples, objects the adaptive window removed first (then the others, in caption order): "
                                     "original | negative from step 0 | fixed window | adaptive window, each with its step "
                                     "window and the reader's verdict (removal_targets.parquet)."))
        body.append("".join(parts))

    known = {"ratio", "removal", "reverse", "removal_methods", "removal_examples"} | set(mech) | set(grids)
    other = {k: v for k, v in figures.items() if k not in known}
    rest = [(t, f) for t, f in sections if t not in used_tables]
    if other or rest:
        parts = ["<h2>Other figures and tables</h2>"]
        parts += [figure_html(k.replace("/", "_"), v, f"Drawn by a study: {k}.png") for k, v in other.items()]
        parts += [f"<h3>{html.escape(t)}</h3>{table_html(f)}" for t, f in rest]
        body.append("".join(parts))
    if not any(body):
        body.append("<p>Nothing to report: the jobs found nothing to measure (e.g. no seed showed the concept, "
                    "no object to remove).</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
            f"<title>negstudy report</title><style>{CSS}</style></head><body><h1>negstudy report</h1>"
            f"{_intro_html(intro)}{''.join(body)}</body></html>")


def _intro_html(intro: str) -> str:
    """The report's first line visible, its rules and intervals folded (the scorecard comes next)."""
    head, sep, rules = intro.partition(" Rules: ")
    if not sep:
        return f"<p>{html.escape(intro)}</p>"
    return (f"<p>{html.escape(head)}</p><details><summary>Rules, intervals, pooling</summary>"
            f"<p>{html.escape('Rules: ' + rules)}</p></details>")


def _mechanism_caption(root: Path, key: str) -> str:
    name = Path(key).name
    what = {"inducing": "projection of eps_pos onto eps_neg with the negative always vs never, and their difference D(t)",
            "momentum": "cosine between consecutive eps_pos, negative always vs never",
            "neutralization": "cosine of (eps_pos - eps_empty) and (eps_neg - eps_empty) inside vs outside the object region",
            "energy": "denoising error along the interpolation between background and object images",
            "attention_grid": "attention grid of one pair-seed"}[name]
    n = ""
    table = root / Path(key).parent / f"{name}.parquet"
    if table.exists():
        df = pd.read_parquet(table)
        units = [c for c in ("pair", "seed") if c in df]
        if units:
            n = f"; n = {len(df[units].drop_duplicates())} pair-seeds"
    return f"Mechanisms ({key}): {what}; means with 95 % bootstrap bands over pair-seeds{n}."
