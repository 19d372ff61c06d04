"""Figures of the mechanism study (PAPER.md sections 3 and 5): attention grids and mechanism curves.

Every ``fig_*`` takes a tidy table (or maps) and returns a :class:`matplotlib.figure.Figure` built
without pyplot (no global state, nothing to close, any backend); :func:`save` writes it as a PNG,
atomically. Curves are means over independent units (pair x seed, or pair x seed x noise draw for
the energy) with 95 % percentile-bootstrap bands (:func:`negstudy.tables.summarize`).
Step axes are UNet-call indices (:mod:`negstudy.schedules`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from negstudy.attention import AttentionRecorder, mass_in_mask, prompt_words
from negstudy.critical import HIT_LIFT, attention_hit_step
from negstudy.records import atomic_path, to_uint8
from negstudy.sampler import Batch
from negstudy.schedules import Always, Never
from negstudy.shapes import world

COLOURS = {"always": "tab:red", "never": "tab:blue", "inside": "tab:red", "outside": "tab:blue", "all": "tab:grey"}


def save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomic: complete or absent)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _band(ax, df: pd.DataFrame, x: str, value: str, units: Sequence[str], label: str, colour: str | None = None):
    from negstudy.tables import summarize

    s = summarize(df, x, value, units)
    n = int(s.n.max()) if len(s) else 0
    line, = ax.plot(s[x], s["mean"], color=colour, label=f"{label} (n={n})")
    ax.fill_between(s[x], s["low"], s["high"], color=line.get_color(), alpha=0.2, lw=0)
    return s


def _units(df: pd.DataFrame) -> list[str]:
    return [c for c in ("pair", "seed", "item") if c in df.columns]


# ----------------------------------------------------------------------------- attention grid


def window_means(maps, windows: Sequence[tuple[int, int]]) -> np.ndarray:
    """(steps, h, w) per-step maps -> (len(windows), h, w) means over each inclusive step window, NaN-aware."""
    m = np.asarray(maps, dtype=np.float64)
    out = np.full((len(windows), *m.shape[1:]), np.nan)
    for k, (a, b) in enumerate(windows):
        chunk = m[a : b + 1]
        keep = ~np.isnan(chunk).all(axis=(1, 2))
        if keep.any():
            out[k] = chunk[keep].mean(0)
    return out


def step_windows(n_steps: int, window: int) -> list[tuple[int, int]]:
    """Consecutive inclusive windows (first, last) of ``window`` steps covering 0..n_steps-1 (the last may be shorter)."""
    return [(a, min(a + window, n_steps) - 1) for a in range(0, n_steps, window)]


def fig_attention_grid(maps_pos, maps_neg, windows: Sequence[tuple[int, int]], hit_window: int | None,
                       image: np.ndarray | None = None, title: str = "Cross-attention by step window",
                       words: tuple[str, str] = ("positive", "negative"), region: np.ndarray | None = None,
                       hit_label: str = "first hit") -> Figure:
    """The paper's Figures 1/4: rows = positive-branch and negative-branch map of a word, columns = step windows.

    maps_pos, maps_neg: (steps, h, w) per-step maps (NaN where not recorded), averaged over each
    window of ``windows`` (inclusive (first, last) step pairs); each row shares one colour scale.
    hit_window: index of the first window whose negative map hits the object region (boxed), or
    None. image: optional (H, W, 3) image shown in a first column; region: optional bool (h, w)
    object region, outlined on every map and on the image. words: the row labels. hit_label: the
    text under the boxed window (e.g. the step of the hit).
    """
    rows = [window_means(maps_pos, windows), window_means(maps_neg, windows)]
    offset = 1 if image is not None else 0
    cols = len(windows) + offset
    fig = Figure(figsize=(1.5 * cols + 0.6, 3.4))
    axes = fig.subplots(2, cols, squeeze=False)
    for r, (means, branch, word) in enumerate(zip(rows, ("positive", "negative"), words)):
        vmax = np.nanmax(means) if np.isfinite(means).any() else 1.0
        for c, (a, b) in enumerate(windows):
            ax = axes[r, c + offset]
            ax.imshow(np.nan_to_num(means[c]), cmap="viridis", vmin=0, vmax=vmax or 1.0, interpolation="nearest")
            if region is not None and np.any(region):
                ax.contour(np.asarray(region, dtype=float), levels=[0.5], colors="white", linewidths=0.8)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"steps {a}-{b}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{branch}\n'{word}'", fontsize=8)
        if offset:
            ax = axes[r, 0]
            ax.axis("off")
            if r == 0:
                ax.imshow(image, interpolation="nearest")
                if region is not None and np.any(region):
                    ax.contour(np.asarray(region, dtype=float), levels=[0.5], colors="white", linewidths=0.8)
                ax.set_title("image", fontsize=8)
    if hit_window is not None:
        for r in range(2):
            ax = axes[r, hit_window + offset]
            ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, edgecolor="red", lw=3, clip_on=False))
        axes[1, hit_window + offset].set_xlabel(hit_label, color="red", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def attention_grid_for(sampler, prompt: str, negative: str, seed: int, window: int = 5, hit_lift: float = HIT_LIFT,
                       positive_word: str | None = None, reader=None) -> tuple[Figure, pd.DataFrame]:
    """Figure 1/4 for one (prompt, negative, seed), with the "right place" decided automatically.

    One batch: the negative at every step (cross-attention recorded in both branches) and the same
    seed without it. The region is the reader's (:mod:`negstudy.evaluators.reader`; default: the
    shapes oracle) region of the negative's object in the image without the negative, pooled onto
    the maps' grid; a reader that does not locate (CLIP, a judge) gives none: no window is boxed. Per window of ``window`` steps, the mass of the window-mean map inside the region
    (:func:`negstudy.attention.mass_in_mask`); the first window whose negative-branch map puts
    ``hit_lift`` times a uniform map's mass on the region is the hit (the attention hit rule,
    :func:`negstudy.critical.attention_hit_step`, on the window masses).
    positive_word: the positive-branch row (default: the first object the prompt names, else its
    last word). Returns the figure and a table window, first_step, last_step, branch, word,
    mass_in_region, hit (NaN masses when the object does not appear without the negative), heat (the
    window-mean map, float32 (h, w): not written to parquet; W&B shows it in a table).
    """
    from negstudy.attention import mask_on_grid

    if reader is None:
        from negstudy.evaluators.ensemble import oracle_readings
        from negstudy.evaluators.reader import ShapesReader

        reader = ShapesReader("oracle", oracle_readings, locates=True)
    positive_word = positive_word or positive_word_of(prompt)
    n = sampler.n_calls
    recorder = AttentionRecorder(sampler.unet, words=[negative, positive_word])
    batch = Batch([prompt] * 2, [negative] * 2, [seed] * 2, [Always().plan(n), Never().plan(n)])
    images = to_uint8(sampler.generate(batch, [recorder]))
    look = reader.look(images[1:2], [negative], ["object"])[0]
    present, region = look.present, look.region
    maps_pos = recorder.maps(0, "positive", positive_word).float().numpy()
    maps_neg = recorder.maps(0, "negative", negative).float().numpy()
    windows = step_windows(n, window)
    rows = []
    grid = mask_on_grid(region, maps_neg.shape[1:]) if region is not None else None  # pixels -> the maps' grid
    grid = grid if grid is not None and grid.any() else None
    for branch, word, maps in (("positive", positive_word, maps_pos), ("negative", negative, maps_neg)):
        for k, mean in enumerate(window_means(maps, windows)):
            mass = mass_in_mask(mean, grid) if grid is not None else float("nan")
            rows.append({"window": k, "first_step": windows[k][0], "last_step": windows[k][1], "branch": branch,
                         "word": word, "mass_in_region": mass, "heat": mean.astype(np.float32)})
    table = pd.DataFrame(rows)
    neg = table[table.branch == "negative"].sort_values("window")
    hit = attention_hit_step(neg.mass_in_region.to_numpy(), float(grid.mean()), hit_lift) if grid is not None else None
    table["hit"] = table.window == hit if hit is not None else False
    where = ("object region outlined" if region is not None else
             "object present, its region not located by this reader" if present else
             "object absent without the negative: no region" if present is False else "object not judged: no region")
    fig = fig_attention_grid(maps_pos, maps_neg, windows, hit, image=images[1], words=(positive_word, negative), region=region,
                             title=f"'{prompt}', negative '{negative}', seed {seed}\nimage without the negative, {where}; "
                                   f"boxed: first window whose map puts >= {hit_lift:g}x a uniform map's mass on the region")
    return fig, table


def positive_word_of(prompt: str) -> str:
    """The positive-branch word of a prompt's attention grid: the first object it names, else its last word."""
    named = world.parse_caption(prompt).objects
    return named[0] if named else prompt_words(prompt)[-1]


def save_word_maps(recorder: AttentionRecorder, image: int, prompt: str, negative: str, region: np.ndarray | None,
                   path: Path) -> Path:
    """Write one image's per-step word maps for a later attention grid (:mod:`negstudy.report_html`).

    ``path`` (.npz, atomic): positive = the positive word's map in the positive branch, negative =
    the negative prompt's map in the negative branch, both (steps, h, w) float16 with NaN at steps
    the branch was not computed; region = the concept's bool (h, w) mask (shape (0, 0) when none);
    prompt, negative, positive_word. The recorder must keep both words (``words=[negative,
    positive_word_of(prompt)]``).
    """
    word = positive_word_of(prompt)
    arrays = {"positive": recorder.maps(image, "positive", word).numpy(), "negative": recorder.maps(image, "negative", negative).numpy(),
              "region": np.zeros((0, 0), bool) if region is None else np.asarray(region, bool),
              "prompt": np.array(prompt), "negative_prompt": np.array(negative), "positive_word": np.array(word)}
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return Path(path)


# ----------------------------------------------------------------------------- mechanism curves


def fig_inducing(df: pd.DataFrame) -> Figure:
    """|proj(eps_pos onto eps_neg)|_rms under always / never (left) and their difference D(t) (right)."""
    fig = Figure(figsize=(10, 3.8))
    left, right = fig.subplots(1, 2)
    units = _units(df)
    _band(left, df, "step", "proj_always", units, "negative at every step", COLOURS["always"])
    _band(left, df, "step", "proj_never", units, "negative never", COLOURS["never"])
    left.set(xlabel="step (UNet call)", ylabel="|proj(eps_pos onto eps_neg)|  (RMS)", title="projection")
    left.legend(fontsize=8)
    _band(right, df, "step", "D", units, "D(t)", "black")
    right.axhline(0, color="grey", lw=0.8)
    right.set(xlabel="step (UNet call)", ylabel="D(t) = always - never  (RMS)", title="inducing effect")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_momentum(df: pd.DataFrame) -> Figure:
    """m(t) = cos(eps_pos(t), eps_pos(t + 1)) under always and never."""
    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    units = _units(df)
    for schedule, g in df.groupby("schedule"):
        _band(ax, g, "step", "m", units, f"negative {schedule}", COLOURS.get(schedule))
    ax.set(xlabel="step t (UNet call)", ylabel="cos(eps_pos(t), eps_pos(t+1))", title="momentum")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_neutralization(df: pd.DataFrame) -> Figure:
    """cos(eps_pos - eps_empty, eps_neg - eps_empty) inside vs outside the object region, per schedule."""
    schedules = sorted(df.schedule.unique())
    fig = Figure(figsize=(5 * len(schedules), 3.8))
    axes = np.atleast_1d(fig.subplots(1, len(schedules), sharey=True))
    units = _units(df)
    for ax, schedule in zip(axes, schedules):
        g = df[df.schedule == schedule]
        for where in ("inside", "outside"):
            _band(ax, g[g["where"] == where], "step", "cos", units, f"{where} the object region", COLOURS[where])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="step (UNet call)", title=f"negative {schedule}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("cos(eps_pos - eps_empty, eps_neg - eps_empty)")
    fig.suptitle("neutralization: alignment of the prompt and negative directions")
    fig.tight_layout()
    return fig


def fig_energy(df: pd.DataFrame) -> Figure:
    """Denoising error along z = theta z_bg + (1 - theta) z_obj (left) and relative to the endpoints (right)."""
    fig = Figure(figsize=(10, 3.8))
    left, right = fig.subplots(1, 2)
    units = _units(df) + ["draw"]
    for (step, timestep), g in df.groupby(["step", "timestep"]):
        _band(left, g, "theta", "error", units, f"step {step} (t={timestep})")
        _band(right, g, "theta", "relative", units, f"step {step} (t={timestep})")
    left.set(xlabel="theta  (0: object image, 1: background image)", ylabel="||eps_hat - eps||^2 (mean per entry)",
             title="energy proxy")
    right.axhline(1, color="grey", lw=0.8)
    right.set(xlabel="theta", ylabel="error / mean(error at theta 0 and 1)", title="energy barrier")
    left.legend(fontsize=8), right.legend(fontsize=8)
    fig.tight_layout()
    return fig
