"""How a negative prompt acts (PAPER.md section 5): inducing, momentum, neutralization, energy barrier.

Step index: the UNet-call index of :mod:`negstudy.schedules`, ``0 <= step < n_calls`` (31 calls for
PNDM with 30 steps). Predictions are ``(B, C, h, w)`` noise predictions (unit variance by training);
a "flattened" prediction is the vector of its ``n = C h w`` entries. Norms are reported as RMS per
entry, ``|v|_rms = |v|_2 / sqrt(n)`` (1 for a standard normal vector), so numbers compare across
resolutions and between Stable Diffusion latents and the 32x32 pixel-space shapes model.

Inducing, momentum and neutralization read ONE trajectory per image with all three predictions at
every step (``three_branches``): :class:`MechanismRecorder` reduces each step to a few scalars per
image as it runs; no prediction is kept beyond the previous step's eps_pos. :func:`trace` runs, in
one batch, the negative at every step (``always``) and never (``never``) from the same x_T.

- inducing (:func:`inducing`)::

      proj(a onto b) = (a.b / b.b) b,                          a, b flattened (n,)
      P(t) = |proj(eps_pos(t) onto eps_neg(t))|_rms = |a.b| / (|b|_2 sqrt(n))
      D(t) = P(t) under always - P(t) under never              (RMS noise units, per image)

  Both trajectories start from the same x_T and their first UNet call sees identical inputs, so
  D(0) = 0 exactly; the schedules differ from the first scheduler update on.
- momentum (:func:`momentum`): ``m(t) = cos(eps_pos(t), eps_pos(t + 1))`` for t = 0..n_calls-2,
  under both schedules.
- neutralization (:func:`neutralization`): ``cos(eps_pos - eps_empty, eps_neg - eps_empty)``
  restricted to the entries (3 or 4 channels x pixels) inside the negative's object region, and to
  those outside it. The region is the study reader's (:mod:`negstudy.evaluators.reader`: the shapes
  oracle's mask, or a detector's boxes) region of the object in the image generated WITHOUT the
  negative (same seed), pooled onto the latent grid (pixel-space: the mask itself). A reader that
  does not locate (CLIP, a judge) leaves neutralization out; ``evaluator=none`` also leaves out the
  energy barrier, whose object and background images must be confirmed by a reader.
- energy barrier (:func:`energy_barrier`, Figure 5): a background image z_bg and an object image
  z_obj, mixed ``z = theta z_bg + (1 - theta) z_obj``, noised at a fixed step's timestep t with
  several noise draws eps, and scored by the denoising error conditional on the positive prompt::

      z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps,   E = mean_{C,h,w} (eps_hat(z_t, t, c_pos) - eps)^2

  z is the image in [-1, 1] for pixel-space models, the VAE latent (times its scaling factor)
  otherwise. The same draws are used for every theta (paired), so E(theta) - E(0) is not blurred by
  noise-to-noise variation.

The driver :func:`run` writes ``inducing``, ``momentum``, ``neutralization`` and ``energy`` tables
(parquet) and their figures; :func:`summarize` gives means with bootstrap bands over seeds.

The author's definitions, beside negstudy's
-------------------------------------------
Read in the author's public code (GitHub banyuanhao/daam); negstudy's own stay the defaults.

- inducing, L2 units (always written: columns ``proj_always_l2``, ``proj_never_l2``, ``D_l2``)::

      D_l2(t) = |proj(eps_pos(t) onto eps_neg(t))|_2 under always - the same under never
              = sqrt(n) D(t)                                    (n = C h w entries: 16384 for SD2-base)

  Source: ``wrapupdata/how.ipynb``, ``exp_diff``: ``torch.norm(projectionalliinone(pos, neg))`` (the
  L2 norm of the projection of the whole flattened latent) with ``negative_time=40`` (always) minus
  ``negative_time=0`` (never), ``diff[0:10]`` (the first 10 steps), mean over 10 seeds drawn with
  ``random.randint`` (not the paper's fixed seed list). The paper's "up to ~0.37" is in these
  units; negstudy's RMS unit divides it by sqrt(n) (0.37 / 128 = 0.0029 on SD2-base), so that
  numbers compare across latent sizes and with the 32x32x3 pixel-space shapes model.
- momentum of signs (always written: column ``m_sign`` of the momentum table)::

      m_sign(t) = cos(sign(eps_pos(t)), sign(eps_pos(t + 1))) = 1 - 2 (fraction of entries whose sign flips)

  (the second form when no entry is exactly 0). Source: ``scripts/noises.py``:
  ``F.cosine_similarity(torch.sign(positive_noises[i]), torch.sign(positive_noises[i + 1]))`` on one
  trajectory with the negative at every step. negstudy's ``m`` compares the raw vectors, so large
  entries dominate it; ``m_sign`` counts every entry alike and is lower whenever small entries flip.
- energy barrier, ``mechanisms.energy=paper`` (or ``both``: the two in one table with a
  ``variant`` column, negstudy / paper)::

      z_t = sqrt(abar_100) z + sqrt(1 - abar_100) eps,   E = mean (eps_hat(z_t, t = 100, c("   ")) - eps)^2,
      theta in {0, 0.01, ..., 1} (101 weights)

  Source: ``wrapupdata/analysis/analysis.ipynb``, ``compute_loss_combo`` called with
  ``timesteps=torch.tensor([100])`` and the text ``"   "`` (three spaces: the tokenizer gives BOS,
  EOS and padding, i.e. the empty prompt) for ``i/100``, i = 0..100. t = 100 is a raw training
  timestep, not a step of the sampling loop: its rows have ``step = -1`` and ``timestep = 100``.
  Kept from negstudy in this variant: the VAE posterior MEAN (the notebook takes a
  ``latent_dist.sample()`` per call), and the same ``draws`` noise draws for every theta (the
  notebook draws one fresh noise per theta, so its curve carries noise-to-noise variation); both
  leave the expected error unchanged. The notebook's v-prediction branch compares against the
  velocity; SD2-base predicts eps, where the two agree.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from negstudy.attention import mask_on_grid
from negstudy.critical import HIT_LIFT
from negstudy.datasets import pairs_of
from negstudy.records import to_uint8, write_table
from negstudy.sampler import Batch, Hook, NegativeSampler, StepState
from negstudy.schedules import Always, Never
from negstudy.shapes import world
from negstudy.studies import note_limits, reader_for, screen_without_negative
from negstudy.tables import summarize  # noqa: F401 - the curves' means and bands, importable from here as before

log = logging.getLogger("negstudy")

THETAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))  # energy-barrier mixing grid
# Steps (UNet-call indices) whose timesteps noise the mixtures. At 30 PNDM steps, step 10 (t=661 on
# the shapes model) leaves so little signal that the error is flat in theta; the barrier shows at
# step 20 (t=331) and later, so both are measured.
ENERGY_STEPS = (10, 20)
ENERGY_DRAWS = 8  # noise draws per image pair
# The author's energy barrier (wrapupdata/analysis/analysis.ipynb): raw timestep 100, the prompt "   ",
# 101 mixing weights i / 100
PAPER_ENERGY_TIMESTEP = 100
PAPER_ENERGY_PROMPT = "   "
PAPER_THETAS = tuple(np.round(np.linspace(0.0, 1.0, 101), 2))
ENERGY_VARIANTS = ("negstudy", "paper", "both")
ATTENTION_WINDOW = 5  # steps per window of the attention grid (the paper: 3 or 5)


# ----------------------------------------------------------------------------- vector helpers


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


def project(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """proj(a onto b) = (a.b / b.b) b per image, on flattened (B, ...) tensors; shape of ``b``, float64."""
    fa, fb = _flat(a), _flat(b)
    coef = (fa * fb).sum(1) / (fb * fb).sum(1)
    return (coef[:, None] * fb).reshape(b.shape)


def projection_rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|proj(a onto b)|_rms = |a.b| / (|b|_2 sqrt(n)) per image, (B,) float64; NaN where b = 0."""
    fa, fb = _flat(a), _flat(b)
    return (fa * fb).sum(1).abs() / (fb.norm(dim=1) * math.sqrt(fa.shape[1]))


def projection_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|proj(a onto b)|_2 = |a.b| / |b|_2 per image, (B,) float64: the author's unit (sqrt(n) x the RMS)."""
    fa, fb = _flat(a), _flat(b)
    return (fa * fb).sum(1).abs() / fb.norm(dim=1)


def sign_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(sign(a), sign(b)) per image over flattened (B, ...) tensors, (B,) float64 (scripts/noises.py)."""
    return cosine(torch.sign(a), torch.sign(b))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between flattened (B, ...) tensors per image, (B,) float64; NaN where one is 0."""
    fa, fb = _flat(a), _flat(b)
    return (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1))


def masked_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosine of a and b (B, C, h, w) over the channels x pixels where ``mask`` (B, h, w) or (h, w) is True.

    Returns (B,) float64; NaN for an empty mask or where a or b vanishes on it.
    """
    m = torch.as_tensor(mask, device=a.device).bool()
    m = m.expand(a.shape[0], *m.shape[-2:]).unsqueeze(1).double()  # (B, 1, h, w), broadcast over channels
    a, b = a.double(), b.double()
    dot = (a * b * m).sum((1, 2, 3))
    return dot / ((a * a * m).sum((1, 2, 3)) * (b * b * m).sum((1, 2, 3))).sqrt()


def region_at(mask, size: tuple[int, int]) -> torch.Tensor:
    """:func:`negstudy.attention.mask_on_grid` as a bool tensor (the recorder works on tensors)."""
    return torch.as_tensor(mask_on_grid(mask, size))


# ----------------------------------------------------------------------------- the hook


class MechanismRecorder(Hook):
    """Per-step scalars of the three predictions of every image (the sampler needs ``three_branches``).

    regions: None, or one entry per image of the batch: a bool (H, W) mask of the negative's object
    (image or latent grid), or None for an image without one (its neutralization columns are NaN).

    :meth:`table` has one row per image and step: ``proj`` = |proj(eps_pos onto eps_neg)|_rms,
    ``coef`` = a.b / b.b, ``momentum`` = cos(eps_pos(step), eps_pos(step + 1)) (NaN at the last
    step), ``proj_l2`` = |proj|_2 and ``momentum_sign`` = cos of the signs (the author's
    definitions, see the module docstring), ``neutral_inside`` / ``neutral_outside`` / ``neutral_all`` = cos(eps_pos - eps_empty,
    eps_neg - eps_empty) over the region / the rest / everything. Only eps_pos of the previous
    step is held between steps.
    """

    COLUMNS = ("proj", "coef", "momentum", "neutral_inside", "neutral_outside", "neutral_all", "proj_l2",
               "momentum_sign")

    def __init__(self, regions: Sequence | None = None):
        self.regions = regions
        self._rows: list[tuple[int, torch.Tensor]] = []
        self._table: pd.DataFrame | None = None

    def on_start(self, sampler: NegativeSampler, batch: Batch) -> None:
        if not sampler.three_branches:
            raise ValueError("MechanismRecorder needs eps_pos, eps_neg and eps_empty at every step: "
                             "use NegativeSampler(..., three_branches=True)")
        if self.regions is not None and len(self.regions) != len(batch):
            raise ValueError(f"{len(self.regions)} regions for a batch of {len(batch)} images")
        size = tuple(sampler.latent_shape[1:])
        self._masks = None
        if self.regions is not None:
            empty = torch.zeros(size, dtype=torch.bool)
            masks = [region_at(r, size) if r is not None else empty for r in self.regions]
            self._masks = torch.stack(masks).to(sampler.device)  # (B, h, w)
            self._has_region = torch.tensor([r is not None for r in self.regions], device=sampler.device)
        self._prev: torch.Tensor | None = None
        self._rows, self._table = [], None

    def on_step(self, state: StepState) -> None:
        pos, neg, empty = (state.eps[k] for k in ("positive", "negative", "empty"))
        b = pos.shape[0]
        nan = torch.full((b,), float("nan"), dtype=torch.float64, device=pos.device)
        fa, fb = _flat(pos), _flat(neg)
        values = {
            "proj": projection_rms(pos, neg),
            "coef": (fa * fb).sum(1) / (fb * fb).sum(1),
            "momentum": nan.clone(),  # filled in at the next step
            "neutral_inside": nan, "neutral_outside": nan,
            "neutral_all": cosine(pos - empty, neg - empty),
            "proj_l2": projection_l2(pos, neg),
            "momentum_sign": nan.clone(),  # filled in at the next step
        }
        if self._masks is not None:
            d_pos, d_neg = pos - empty, neg - empty
            keep = self._has_region
            values["neutral_inside"] = torch.where(keep, masked_cosine(d_pos, d_neg, self._masks), nan)
            values["neutral_outside"] = torch.where(keep, masked_cosine(d_pos, d_neg, ~self._masks), nan)
        if self._prev is not None:
            self._rows[-1][1][:, self.COLUMNS.index("momentum")] = cosine(self._prev, pos)
            self._rows[-1][1][:, self.COLUMNS.index("momentum_sign")] = sign_cosine(self._prev, pos)
        self._prev = pos.clone()
        self._rows.append((state.step, torch.stack([values[c] for c in self.COLUMNS], 1)))

    def on_end(self, images) -> None:
        frames = []
        for step, values in self._rows:
            v = values.cpu().numpy()
            frame = pd.DataFrame(v, columns=list(self.COLUMNS))
            frame.insert(0, "step", step)
            frame.insert(0, "image", np.arange(len(v)))
            frames.append(frame)
        self._table = pd.concat(frames, ignore_index=True).sort_values(["image", "step"], ignore_index=True)
        self._rows, self._prev = [], None

    def close(self) -> None:
        self._prev = None

    def table(self) -> pd.DataFrame:
        """image, step and the columns of :attr:`COLUMNS`, for the last ``generate`` call."""
        if self._table is None:
            raise RuntimeError("no finished trajectory recorded yet")
        return self._table


def with_branches(sampler: NegativeSampler, three_branches: bool) -> NegativeSampler:
    """The sampler itself if it already computes the branches asked for, else a twin over the same pipeline."""
    if sampler.three_branches == three_branches:
        return sampler
    return NegativeSampler(sampler.pipe, steps=sampler.steps, guidance_scale=sampler.guidance_scale,
                           height=sampler.height, width=sampler.width, three_branches=three_branches,
                           progress=sampler.progress)


def trace(sampler: NegativeSampler, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int],
          regions: Sequence | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Always and never trajectories of each (prompt, negative, seed) item, three branches, one batch.

    regions: per item, the negative object's mask (see :class:`MechanismRecorder`) or None.
    Returns the per-step table (item, schedule, step, the recorder's columns) and the images
    (2 k, H, W, 3) in [0, 1]: items 0..k-1 under always, then the same items under never.
    """
    three = with_branches(sampler, True)
    n, k = three.n_calls, len(prompts)
    batch = Batch(list(prompts) * 2, list(negatives) * 2, [int(s) for s in seeds] * 2,
                  [Always().plan(n)] * k + [Never().plan(n)] * k)
    recorder = MechanismRecorder(list(regions) * 2 if regions is not None else None)
    images = three.generate(batch, [recorder])
    table = recorder.table()
    table.insert(0, "schedule", np.where(table.image < k, "always", "never"))
    table.insert(0, "item", table.pop("image") % k)
    return table, images


# ----------------------------------------------------------------------------- the analyses


def inducing(steps: pd.DataFrame) -> pd.DataFrame:
    """D(t) per item from :func:`trace`'s table: item, step, proj_always, proj_never, D (RMS noise units),
    and the same in the author's L2 units: proj_always_l2, proj_never_l2, D_l2 (= sqrt(n) D)."""
    out = []
    for column, suffix in (("proj", ""), ("proj_l2", "_l2")):
        wide = steps.pivot_table(index=["item", "step"], columns="schedule", values=column)
        wide = wide.rename(columns={"always": "proj_always" + suffix, "never": "proj_never" + suffix}).rename_axis(columns=None)
        wide["D" + suffix] = wide["proj_always" + suffix] - wide["proj_never" + suffix]
        out.append(wide[["proj_always" + suffix, "proj_never" + suffix, "D" + suffix]])
    return pd.concat(out, axis=1).reset_index()


def momentum(steps: pd.DataFrame) -> pd.DataFrame:
    """m(t) = cos(eps_pos(t), eps_pos(t + 1)): item, schedule, step (t = 0..n_calls-2), m, and
    m_sign = cos(sign(eps_pos(t)), sign(eps_pos(t + 1))) (the author's scripts/noises.py)."""
    m = steps[["item", "schedule", "step", "momentum", "momentum_sign"]].dropna(subset=["momentum"])
    return m.rename(columns={"momentum": "m", "momentum_sign": "m_sign"}).reset_index(drop=True)


def neutralization(steps: pd.DataFrame) -> pd.DataFrame:
    """Alignment of the two guidance directions inside vs outside the object region.

    item, schedule, step, where ("inside", "outside", "all"), cos; items without a region are left out.
    """
    cols = {"neutral_inside": "inside", "neutral_outside": "outside", "neutral_all": "all"}
    has = steps.groupby("item").neutral_inside.transform(lambda s: s.notna().any())
    long = steps[has].melt(id_vars=["item", "schedule", "step"], value_vars=list(cols), var_name="where", value_name="cos")
    long["where"] = long["where"].map(cols)
    return long.sort_values(["item", "schedule", "where", "step"], ignore_index=True)


def to_latents(sampler: NegativeSampler, images: np.ndarray) -> torch.Tensor:
    """Images (B, H, W, 3), uint8 or float in [0, 1] -> z (B, C, h, w) on the sampler's device.

    Pixel-space models: the image in [-1, 1]. Latent models: the VAE posterior mean times the
    VAE's scaling factor (what the UNet was trained on).
    """
    x = np.asarray(images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    z = torch.from_numpy(x).permute(0, 3, 1, 2).to(sampler.device, sampler.unet.dtype) * 2 - 1
    if sampler.vae is not None:
        with torch.no_grad():
            z = sampler.vae.encode(z).latent_dist.mean * sampler.vae.config.scaling_factor
    return z


def denoising_error(sampler: NegativeSampler, z: torch.Tensor, step: int, cond: torch.Tensor,
                    noise: torch.Tensor, timestep: int | None = None, added_cond: dict | None = None) -> torch.Tensor:
    """Mean over (C, h, w) of (eps_hat(z_t, t, cond) - eps)^2 for clean z (B, C, h, w), (B,) float64.

    t = the timestep of ``step`` (UNet-call index) after ``set_timesteps(sampler.steps)``;
    z_t = sqrt(abar_t) z + sqrt(1 - abar_t) noise; cond (B, tokens, dim) text embeddings.
    v-prediction models are converted to eps: eps_hat = sqrt(1 - abar) z_t + sqrt(abar) v.
    timestep: a raw training timestep instead (``step`` is then ignored; the paper's variant: 100).
    added_cond: SDXL's ``added_cond_kwargs`` of the rows (:meth:`NegativeSampler.added_cond`).
    """
    sched = sampler.scheduler
    sched.set_timesteps(sampler.steps, device=sampler.device)
    t = sched.timesteps[step] if timestep is None else torch.tensor(int(timestep), device=sampler.device)
    abar = sched.alphas_cumprod[int(t)].to(device=z.device, dtype=torch.float64)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    z_t = (a * z.double() + s * noise.double()).to(z.dtype)
    with torch.no_grad():
        # z_t is the UNet's training input: no scale_model_input (the identity for PNDM and DDIM; Euler's
        # would rescale its own sigma-space sample, which z_t is not)
        out = sampler.unet(z_t, t, encoder_hidden_states=cond, added_cond_kwargs=added_cond, return_dict=False)[0]
    out = out.double()
    if sched.config.prediction_type == "v_prediction":
        out = s * z_t.double() + a * out
    elif sched.config.prediction_type != "epsilon":
        raise ValueError(f"prediction_type={sched.config.prediction_type!r}: the energy proxy needs eps or v")
    return ((out - noise.double()) ** 2).mean((1, 2, 3))


def energy_noise(shape: Sequence[int], draws: int, seed: int, device) -> torch.Tensor:
    """(draws, *shape) standard normal draws from a CPU generator seeded with ``seed``."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((draws, *shape), generator=g).to(device)


def energy_barrier(sampler: NegativeSampler, prompts: Sequence[str], z_bg: torch.Tensor, z_obj: torch.Tensor,
                   thetas: Sequence[float] = THETAS, steps: Sequence[int] = ENERGY_STEPS, draws: int = ENERGY_DRAWS,
                   noise_seeds: Sequence[int] | None = None, max_rows: int = 128,
                   timesteps: Sequence[int] | None = None) -> pd.DataFrame:
    """Denoising error along the mix z = theta z_bg + (1 - theta) z_obj (PAPER.md Figure 5).

    prompts: per image pair, the positive prompt the UNet is conditioned on; z_bg, z_obj: (P, C, h, w)
    from :func:`to_latents`. Pair i uses noise :func:`energy_noise` (draws, C, h, w) seeded with
    ``noise_seeds[i]`` (default i), the same for every theta and step.
    Returns item, step, timestep, draw, theta, error (see :func:`denoising_error`), and relative =
    error / mean(error at theta 0, error at theta 1) of the same item, step and draw (NaN without
    both ends in ``thetas``). timesteps: raw training timesteps instead of ``steps`` (their rows
    have step -1); see :func:`paper_energy_barrier`.
    """
    n_pairs = len(prompts)
    if z_bg.shape != z_obj.shape or z_bg.shape[0] != n_pairs:
        raise ValueError(f"z_bg {tuple(z_bg.shape)}, z_obj {tuple(z_obj.shape)} and {n_pairs} prompts must pair up")
    seeds = list(range(n_pairs)) if noise_seeds is None else [int(s) for s in noise_seeds]
    noise = torch.stack([energy_noise(z_bg.shape[1:], draws, s, z_bg.device) for s in seeds])  # (P, draws, C, h, w)
    cond = torch.cat([sampler.encode(p) for p in prompts])
    added = sampler.added_cond(prompts)  # SDXL's pooled embeddings and time ids; None for SD 1/2
    rows = [(i, d, th) for i in range(n_pairs) for d in range(draws) for th in thetas]
    sched = sampler.scheduler
    sched.set_timesteps(sampler.steps)
    out = []
    points = [(int(s), int(sched.timesteps[s]), None) for s in steps] if timesteps is None else \
        [(-1, int(t), int(t)) for t in timesteps]
    for step, timestep, raw in points:
        for start in range(0, len(rows), max_rows):
            chunk = rows[start : start + max_rows]
            i = torch.tensor([r[0] for r in chunk], device=z_bg.device)
            d = torch.tensor([r[1] for r in chunk], device=z_bg.device)
            th = torch.tensor([r[2] for r in chunk], device=z_bg.device, dtype=z_bg.dtype).view(-1, 1, 1, 1)
            z = th * z_bg[i] + (1 - th) * z_obj[i]
            extra = {k: v[i] for k, v in added.items()} if added else None
            err = denoising_error(sampler, z, max(step, 0), cond[i], noise[i, d], timestep=raw, added_cond=extra).cpu().numpy()
            out += [(r[0], step, timestep, r[1], float(r[2]), float(e)) for r, e in zip(chunk, err)]
    table = pd.DataFrame(out, columns=["item", "step", "timestep", "draw", "theta", "error"])
    ends = table[table.theta.isin([0.0, 1.0])].groupby(["item", "step", "draw"]).error
    base = ends.mean().where(ends.count() == 2)
    table["relative"] = table.error / base.reindex(pd.MultiIndex.from_frame(table[["item", "step", "draw"]])).to_numpy()
    return table


def paper_energy_barrier(sampler: NegativeSampler, z_bg: torch.Tensor, z_obj: torch.Tensor, draws: int = ENERGY_DRAWS,
                         noise_seeds: Sequence[int] | None = None, thetas: Sequence[float] = PAPER_THETAS,
                         max_rows: int = 128) -> pd.DataFrame:
    """The author's energy barrier (module docstring): raw timestep 100, the prompt "   ", 101 weights.

    Same columns as :func:`energy_barrier`, step = -1, timestep = 100.
    """
    return energy_barrier(sampler, [PAPER_ENERGY_PROMPT] * z_bg.shape[0], z_bg, z_obj, thetas, (), draws, noise_seeds,
                          max_rows, timesteps=[PAPER_ENERGY_TIMESTEP])


# ----------------------------------------------------------------------------- summaries


# ----------------------------------------------------------------------------- the driver


def naming_prompt(prompt: str, negative: str) -> str:
    """The shapes caption of ``prompt`` that also names the negative's objects ("a ball and a sun on the grass");
    on other prompts, the prompt "with" the negative ("a woman in an office, with glasses")."""
    spec, extra = world.parse_caption(prompt), world.parse_caption(negative).objects
    if not extra:
        return f"{prompt}, with {negative}"
    objects = tuple(dict.fromkeys(spec.objects + extra))
    if spec.background is None:
        return f"{prompt} and " + " and ".join(f"a {o}" for o in extra)
    scene = world.Scene(background=spec.background, objects=(), attribute=spec.attribute, named_objects=objects,
                        attribute_named=spec.attribute is not None)
    return world.caption(scene)


def _generate(sampler: NegativeSampler, prompts: list[str], seeds: list[int], chunk: int) -> np.ndarray:
    """uint8 images of the prompts without a negative (plain CFG), ``chunk`` images per batch."""
    plan = Never().plan(sampler.n_calls)
    out = []
    for i in range(0, len(prompts), chunk):
        p, s = prompts[i : i + chunk], seeds[i : i + chunk]
        out.append(to_uint8(sampler.generate(Batch(p, [""] * len(p), s, [plan] * len(p)))))
    return np.concatenate(out)


def _object_region(look, category: str) -> tuple[bool, np.ndarray | None]:
    """Whether the negative's object is surely in the image, and its region where the reader locates it;
    (False, None) for attribute negatives and where the reader is unsure (an unconfirmed object is none)."""
    if category != "object" or look.present is not True:
        return False, None
    return True, look.region


NEEDS = {"presence": "the energy barrier (it needs an object image and a background image, each confirmed by the reader)",
         "regions": "neutralization inside vs outside the object's region and the attention grid"}


def _setting(cfg: DictConfig, key: str, default):
    value = OmegaConf.select(cfg, f"mechanisms.{key}", default=default)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def prepare(cfg: DictConfig, world: str | None) -> dict:
    """Any model; inducing and momentum need no reader, the rest what :data:`NEEDS` says."""
    return {"reader": reader_for(cfg, world)}


def run(cfg: DictConfig, sampler: NegativeSampler, out_dir: Path, reader=None) -> dict[str, pd.DataFrame]:
    """The four mechanism tables and their figures for ``cfg.dataset`` pairs x ``cfg.seeds``.

    Optional settings under ``cfg.mechanisms`` (defaults: the module constants): thetas,
    energy_steps, draws, window, hit_lift (the attention grid's hit rule), and screen_seeds / max_extra: also screen seeds
    0..screen_seeds-1 of each pair without the negative and add up to max_extra of those in which
    the negative's object appears (neutralization needs such seeds; off by default). Every table
    says per row whether the object appeared without the negative and whether the seed was added
    by the screen.

    1. without the negative (plain CFG): each pair's prompt per seed; the reader gives the
       negative object's region if it appears; the prompt naming the object, per seed;
    2. always / never with three branches, regions from 1: inducing, momentum, neutralization;
    3. energy barrier per (pair, seed) with a confirmed background and object image of that seed:
       z_obj = the image without the negative if the object is there, else the naming prompt's
       image; z_bg = the image with the negative (object gone) in the first case, else the image
       without it; pairs the reader cannot confirm (absent or unsure) are left out;
    4. an attention grid (Figures 1/4) for the first (pair, seed) with a region.
    """
    from negstudy import figures

    out_dir = Path(out_dir)
    thetas = [float(t) for t in _setting(cfg, "thetas", list(THETAS))]
    energy_steps = [int(s) for s in _setting(cfg, "energy_steps", list(ENERGY_STEPS))]
    draws = int(_setting(cfg, "draws", ENERGY_DRAWS))
    window = int(_setting(cfg, "window", ATTENTION_WINDOW))
    hit_lift = float(_setting(cfg, "hit_lift", HIT_LIFT))
    screen_seeds = int(_setting(cfg, "screen_seeds", 0))
    energy_variant = _setting(cfg, "energy", "negstudy")  # negstudy | paper | both (module docstring)
    if energy_variant not in ENERGY_VARIANTS:
        raise ValueError(f"mechanisms.energy={energy_variant!r}: allowed values are {', '.join(ENERGY_VARIANTS)}")
    max_extra = int(_setting(cfg, "max_extra", 2))
    chunk = max(1, int(cfg.get("batch_size", 16)) // 2)
    pairs = pairs_of(cfg.dataset)
    plain = with_branches(sampler, False)
    note_limits(out_dir, "mechanisms", reader, NEEDS, ("object",))
    look = reader.look if reader is not None else None

    # 1. without the negative: the object's region per (pair, seed), screening extra seeds if asked
    seeds = list(dict.fromkeys(int(s) for s in cfg.seeds))
    screen_seeds = screen_seeds if reader is not None else 0  # nothing to read: no regions, no energy barrier
    candidates = [(p, s) for p in range(len(pairs)) for s in dict.fromkeys(seeds + list(range(screen_seeds)))]
    screened = (screen_without_negative(plain, reader, [pairs[p].prompt for p, _ in candidates],
                                        [pairs[p].negative for p, _ in candidates], [pairs[p].category for p, _ in candidates],
                                        [s for _, s in candidates], 2 * chunk)
                if reader is not None else [None] * len(candidates))  # inducing and momentum need no image read
    found = {c: _object_region(s, pairs[c[0]].category) if s is not None else (False, None) for c, s in zip(candidates, screened)}
    image_without = {c: s.image for c, s in zip(candidates, screened) if s is not None}
    items = [(p, s) for p in range(len(pairs)) for s in seeds]
    for p in range(len(pairs)):
        extra = [s for s in range(screen_seeds) if s not in seeds and found[(p, s)][0]][:max_extra]
        items += [(p, s) for s in extra]
    k = len(items)
    without = [found[c] for c in items]
    regions = [region for _, region in without]
    meta = pd.DataFrame([{"item": j, "pair": p, "prompt": pairs[p].prompt, "negative": pairs[p].negative,
                          "category": pairs[p].category, "seed": s, "screened": s not in seeds,
                          "present_without_negative": without[j][0]} for j, (p, s) in enumerate(items)])
    log.info("mechanisms: %d (pair, seed) items, object present without the negative in %d", k,
             sum(r is not None for r in regions))

    # 2. always / never trajectories with three branches
    tables, always_images = [], []
    for start in range(0, k, chunk):
        part = items[start : start + chunk]
        steps, images = trace(sampler, [pairs[p].prompt for p, _ in part], [pairs[p].negative for p, _ in part],
                              [s for _, s in part], regions[start : start + chunk])
        steps["item"] += start
        tables.append(steps)
        always_images.append(to_uint8(images[: len(part)]))
    steps = pd.concat(tables, ignore_index=True)
    always_images = np.concatenate(always_images)
    removed = ([v.present is False for v in look(always_images, [pairs[p].negative for p, _ in items],  # surely gone
                                                   [pairs[p].category for p, _ in items])] if look else [False] * k)
    out = {"inducing": inducing(steps), "momentum": momentum(steps), "neutralization": neutralization(steps)}
    region_fraction = {j: float(r.mean()) for j, r in enumerate(regions) if r is not None}
    out["neutralization"]["region_fraction"] = out["neutralization"].item.map(region_fraction)

    # 3. energy barrier: a background and an object image per (pair, seed), confirmed by the reader
    is_object = [pairs[p].category == "object" for p, _ in items]
    need_named = [j for j in range(k) if is_object[j] and not without[j][0]] if look else []
    named_images = _generate(plain, [naming_prompt(pairs[items[j][0]].prompt, pairs[items[j][0]].negative) for j in need_named],
                             [items[j][1] for j in need_named], 2 * chunk) if need_named else []
    named_ok = {j: v.present is True for j, v in zip(need_named, look(named_images, [pairs[items[j][0]].negative for j in need_named],
                                                                       ["object"] * len(need_named)) if need_named else [])}
    named_image = dict(zip(need_named, named_images))
    chosen = []  # (item, z_bg image, z_obj image, bg source, obj source)
    for j, c in enumerate(items):
        if without[j][0] and removed[j]:
            chosen.append((j, always_images[j], image_without[c], "with_negative", "without_negative"))
        elif named_ok.get(j):
            chosen.append((j, image_without[c], named_image[j], "without_negative", "naming_prompt"))
    if chosen:
        z_bg = to_latents(sampler, np.stack([c[1] for c in chosen]))
        z_obj = to_latents(sampler, np.stack([c[2] for c in chosen]))
        noise_seeds = [items[c[0]][1] * 1000 + items[c[0]][0] for c in chosen]
        parts = []
        if energy_variant in ("negstudy", "both"):
            parts.append(energy_barrier(sampler, [pairs[items[c[0]][0]].prompt for c in chosen], z_bg, z_obj, thetas,
                                        energy_steps, draws, noise_seeds=noise_seeds).assign(variant="negstudy"))
        if energy_variant in ("paper", "both"):
            parts.append(paper_energy_barrier(sampler, z_bg, z_obj, draws, noise_seeds).assign(variant="paper"))
        energy = pd.concat(parts, ignore_index=True)
        if energy_variant == "negstudy":  # the default table keeps its columns
            energy = energy.drop(columns="variant")
        energy["item"] = energy.item.map({e: c[0] for e, c in enumerate(chosen)})
        sources = pd.DataFrame([{"item": c[0], "bg_source": c[3], "obj_source": c[4]} for c in chosen])
        energy = energy.merge(sources, on="item")
    else:
        log.warning("mechanisms: no (pair, seed) with a confirmed background and object image: energy table empty")
        energy = pd.DataFrame({"item": pd.Series(dtype="int64"), "step": pd.Series(dtype="int64"),
                               "timestep": pd.Series(dtype="int64"), "draw": pd.Series(dtype="int64"),
                               **{c: pd.Series(dtype="float64") for c in ("theta", "error", "relative")},
                               **{c: pd.Series(dtype="object") for c in ("bg_source", "obj_source")}})
        if energy_variant != "negstudy":
            energy["variant"] = pd.Series(dtype="object")
    out["energy"] = energy

    # 4. tables with the pairs' metadata, then figures
    for name in list(out):
        out[name] = meta.merge(out[name], on="item").drop(columns="item")
        write_table(out[name], out_dir / f"{name}.parquet")
    figures.save(figures.fig_inducing(out["inducing"]), out_dir / "inducing.png")
    figures.save(figures.fig_momentum(out["momentum"]), out_dir / "momentum.png")
    if not out["neutralization"].empty:
        figures.save(figures.fig_neutralization(out["neutralization"]), out_dir / "neutralization.png")
    if not out["energy"].empty:
        figures.save(figures.fig_energy(out["energy"]), out_dir / "energy.png")
    first = next((j for j, r in enumerate(regions) if r is not None), None)
    if first is not None:
        p, seed = items[first]
        fig, windows = figures.attention_grid_for(sampler, pairs[p].prompt, pairs[p].negative, seed, window, hit_lift,
                                                  reader=reader)
        figures.save(fig, out_dir / "attention_grid.png")
        out["attention_windows"] = windows.drop(columns="heat").assign(pair=p, prompt=pairs[p].prompt,
                                                                      negative=pairs[p].negative, seed=seed)
        write_table(out["attention_windows"], out_dir / "attention_windows.parquet")
    return out
