"""Mechanism analyses (PAPER.md section 5): helpers against hand-computed values, the recorder against
a direct computation on the tiny model, the energy proxy's consistency, the figures, and the driver
on the shipped model."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.patches import Rectangle
from omegaconf import OmegaConf
from PIL import Image

from negstudy import figures
from negstudy.sampler import Batch, Hook, NegativeSampler
from negstudy.schedules import Always
from negstudy.studies import mechanisms as mech
from negstudy.tiny import tiny_pipeline

# ----------------------------------------------------------------------------- helpers by hand


def test_projection_and_cosine_by_hand():
    a = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    # (a.b / b.b) b: image 0: 3/1 * (1, 0); image 1: 4/8 * (2, 2)
    assert torch.allclose(mech.project(a, b), torch.tensor([[3.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    # RMS over n = 2 entries: |proj|_2 / sqrt(2)
    assert torch.allclose(mech.projection_rms(a, b), torch.tensor([3 / math.sqrt(2), 1.0], dtype=torch.float64))
    assert torch.allclose(mech.projection_rms(-a, b), mech.projection_rms(a, b))  # a norm: sign-free
    assert torch.allclose(mech.cosine(a, b), torch.tensor([3 / 5, 1.0], dtype=torch.float64))
    assert torch.isnan(mech.projection_rms(a, torch.zeros_like(b))).all()


def test_masked_cosine_by_hand():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 2.0]]]])  # (1, 2 channels, 2, 2)
    b = torch.tensor([[[[1.0, 0.0], [0.0, -4.0]], [[5.0, 1.0], [1.0, 0.0]]]])
    diag = torch.tensor([[True, False], [False, True]])
    # inside: entries (c0: 1, 4; c1: 0, 2) against (1, -4; 5, 0): dot = 1 - 16 = -15, |a|^2 = 21, |b|^2 = 42
    assert mech.masked_cosine(a, b, diag).item() == pytest.approx(-15 / math.sqrt(21 * 42))
    # outside: (2, 3; 1, 0) against (0, 0; 1, 1): dot = 1, |a|^2 = 14, |b|^2 = 2
    assert mech.masked_cosine(a, b, ~diag).item() == pytest.approx(1 / math.sqrt(14 * 2))
    everywhere = torch.ones(2, 2, dtype=torch.bool)
    assert mech.masked_cosine(a, b, everywhere).item() == pytest.approx(mech.cosine(a, b).item())
    assert math.isnan(mech.masked_cosine(a, b, torch.zeros(2, 2, dtype=torch.bool)).item())


def test_region_at_pools_to_the_latent_grid():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # the whole top-left cell
    mask[2, 2] = mask[3, 3] = True  # half of the bottom-right cell
    mask[0, 3] = True  # a quarter of the top-right cell
    assert mech.region_at(mask, (2, 2)).tolist() == [[True, False], [False, True]]
    assert mech.region_at(mask, (4, 4)).tolist() == mask.tolist()


def test_naming_prompt():
    assert mech.naming_prompt("a ball on the grass", "sun") == "a ball and a sun on the grass"
    assert mech.naming_prompt("a view of the grass", "kite") == "a kite on the grass"
    assert mech.naming_prompt("a sun and a box on the sand", "tree") == "a sun, a box and a tree on the sand"


def test_summarize_means_and_bands():
    df = pd.DataFrame([{"seed": s, "step": t, "v": float(s + t)} for s in range(4) for t in range(3)])
    s = mech.summarize(df, "step", "v", ["seed"])
    assert s["mean"].tolist() == [1.5, 2.5, 3.5] and s.n.tolist() == [4, 4, 4]
    assert (s.low <= s["mean"]).all() and (s["mean"] <= s.high).all() and (s.high - s.low > 0).all()


# ----------------------------------------------------------------------------- the recorder on the tiny model


class Capture(Hook):
    """Test-only: keeps every step's full predictions, to check the recorder's reductions against."""

    def __init__(self):
        self.eps = []

    def on_step(self, state):
        self.eps.append({k: v.clone() for k, v in state.eps.items()})


@pytest.fixture(scope="module")
def tiny_sampler():
    return NegativeSampler(tiny_pipeline(0), steps=5, three_branches=True)


def test_recorder_matches_a_direct_computation(tiny_sampler):
    s = tiny_sampler
    n = s.n_calls
    region = np.zeros((32, 32), bool)
    region[4:20, 8:24] = True  # image grid; the latents are 16x16
    batch = Batch(["a cat on the grass"] * 2, ["dog", "ball"], [0, 1], [Always().plan(n)] * 2)
    recorder, capture = mech.MechanismRecorder([region, None]), Capture()
    s.generate(batch, [recorder, capture])
    t = recorder.table().set_index(["image", "step"])
    assert len(t) == 2 * n
    latent_region = mech.region_at(region, (16, 16))
    for step, eps in enumerate(capture.eps):
        pos, neg, empty = eps["positive"], eps["negative"], eps["empty"]
        proj = mech.project(pos, neg).flatten(1).norm(dim=1) / math.sqrt(pos[0].numel())
        assert np.allclose(t.xs(step, level="step").proj, proj.numpy(), rtol=1e-6)
        inside = mech.masked_cosine(pos[:1] - empty[:1], neg[:1] - empty[:1], latent_region)
        assert t.loc[(0, step), "neutral_inside"] == pytest.approx(inside.item(), rel=1e-6)
        assert math.isnan(t.loc[(1, step), "neutral_inside"])  # image 1 has no region
        if step + 1 < n:
            nxt = capture.eps[step + 1]["positive"]
            assert np.allclose(t.xs(step, level="step").momentum, mech.cosine(pos, nxt).numpy(), rtol=1e-6)
    assert t.xs(n - 1, level="step").momentum.isna().all()


def test_inducing_is_zero_where_the_trajectories_coincide(tiny_sampler):
    """Always and never start from the same x_T: the first UNet call sees identical inputs, so D(0) = 0;
    after the first scheduler update (different guidance) the trajectories, and D, differ."""
    steps, images = mech.trace(tiny_sampler, ["a cat on the grass", "a dog in the sky"], ["dog", "ball"], [0, 3])
    d = mech.inducing(steps)
    n = tiny_sampler.n_calls
    assert len(d) == 2 * n and sorted(d.step.unique()) == list(range(n))
    assert (d[d.step == 0].D.abs() <= 1e-12).all()
    assert (d[d.step > 0].D.abs() > 1e-7).any()
    assert (d.proj_always > 0).all() and (d.proj_never > 0).all()
    assert images.shape == (4, 32, 32, 3) and not np.allclose(images[0], images[2])  # always vs never differ

    m = mech.momentum(steps)
    assert m.groupby(["item", "schedule"]).size().tolist() == [n - 1] * 4
    assert sorted(m.step.unique()) == list(range(n - 1))
    assert ((m.m >= -1) & (m.m <= 1)).all()
    assert mech.neutralization(steps).empty  # no regions given


def test_recorder_needs_three_branches():
    two = NegativeSampler(tiny_pipeline(0), steps=3, three_branches=False)
    batch = Batch(["a cat"], ["dog"], [0], [Always().plan(two.n_calls)])
    with pytest.raises(ValueError, match="three_branches"):
        two.generate(batch, [mech.MechanismRecorder()])


# ----------------------------------------------------------------------------- the energy proxy


def test_energy_ends_are_the_errors_of_the_pure_images():
    s = NegativeSampler(tiny_pipeline(1, pixel_space=True), steps=10)
    rng = np.random.default_rng(0)
    bg, obj = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    z_bg, z_obj = mech.to_latents(s, bg), mech.to_latents(s, obj)
    assert z_bg.shape == (2, 3, 32, 32) and z_bg.min() >= -1 and z_bg.max() <= 1
    table = mech.energy_barrier(s, ["a ball on the grass", "a box in the sky"], z_bg, z_obj, thetas=[0.0, 0.5, 1.0],
                                steps=[4], draws=3, noise_seeds=[7, 8], max_rows=5)
    assert len(table) == 2 * 3 * 3 and set(table.theta) == {0.0, 0.5, 1.0}

    # independently: z_t = sqrt(abar) z + sqrt(1 - abar) eps, error = mean (unet(z_t) - eps)^2
    s.scheduler.set_timesteps(10)
    t = s.scheduler.timesteps[4]
    abar = float(s.scheduler.alphas_cumprod[int(t)])
    for item, (prompt, seed) in enumerate(zip(["a ball on the grass", "a box in the sky"], [7, 8])):
        noise = torch.randn((3, 3, 32, 32), generator=torch.Generator("cpu").manual_seed(seed))
        for theta, z in ((1.0, z_bg[item]), (0.0, z_obj[item])):
            x = math.sqrt(abar) * z + math.sqrt(1 - abar) * noise
            with torch.no_grad():
                out = s.unet(x, t, encoder_hidden_states=s.encode(prompt).expand(3, -1, -1)).sample
            expected = ((out - noise) ** 2).mean((1, 2, 3)).numpy()
            got = table[(table.item == item) & (table.theta == theta)].sort_values("draw").error.to_numpy()
            assert np.allclose(got, expected, rtol=1e-4)
    ends = table[table.theta.isin([0.0, 1.0])].groupby(["item", "draw"]).relative.mean()
    assert np.allclose(ends, 1.0)  # relative is normalised by the mean of the two ends


# ----------------------------------------------------------------------------- figures


def _png_ok(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert pixels.std() > 5  # something drawn


def _synthetic_tables(rng):
    rows_i, rows_m, rows_n, rows_e = [], [], [], []
    for pair in range(2):
        for seed in range(3):
            for step in range(31):
                rows_i.append({"pair": pair, "seed": seed, "step": step, "proj_always": 1 - 0.01 * step,
                               "proj_never": 1 - 0.005 * step, "D": -0.005 * step + rng.normal(0, 1e-3)})
                for sched in ("always", "never"):
                    if step < 30:
                        rows_m.append({"pair": pair, "seed": seed, "schedule": sched, "step": step, "m": 1 - 0.001 * step})
                    for where, sign in (("inside", 1), ("outside", -1), ("all", 0)):
                        rows_n.append({"pair": pair, "seed": seed, "schedule": sched, "step": step, "where": where,
                                       "cos": sign * 0.3 + rng.normal(0, 0.05)})
            for draw in range(2):
                for theta in np.round(np.linspace(0, 1, 11), 2):
                    e = 0.05 * (1 + 0.2 * math.sin(math.pi * theta)) + rng.normal(0, 1e-3)
                    rows_e.append({"pair": pair, "seed": seed, "draw": draw, "step": 20, "timestep": 331, "theta": theta,
                                   "error": e, "relative": e / 0.05})
    return [pd.DataFrame(r) for r in (rows_i, rows_m, rows_n, rows_e)]


def test_figures_render_to_png(tmp_path):
    ind, mom, neu, en = _synthetic_tables(np.random.default_rng(0))
    for name, fig in (("inducing", figures.fig_inducing(ind)), ("momentum", figures.fig_momentum(mom)),
                      ("neutralization", figures.fig_neutralization(neu)), ("energy", figures.fig_energy(en))):
        path = figures.save(fig, tmp_path / f"{name}.png")
        _png_ok(path)
        assert path.stat().st_size > 10_000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_attention_grid_windows_and_hit_box(tmp_path):
    steps = np.arange(12, dtype=float)[:, None, None] * np.ones((12, 4, 4))
    steps[3] = np.nan  # a step the branch did not compute
    windows = figures.step_windows(12, 5)
    assert windows == [(0, 4), (5, 9), (10, 11)]
    means = figures.window_means(steps, windows)
    assert means[:, 0, 0].tolist() == [np.mean([0, 1, 2, 4]), 7.0, 10.5]
    image = np.zeros((4, 4, 3), np.uint8)
    region = np.zeros((4, 4), bool)
    region[1:3, 1:3] = True
    fig = figures.fig_attention_grid(steps, steps[::-1], windows, 1, image=image, region=region, words=("ball", "sun"))
    axes = fig.axes
    assert len(axes) == 2 * (len(windows) + 1)
    boxed = [i for i, ax in enumerate(axes) if any(isinstance(p, Rectangle) and p.get_edgecolor()[0] == 1.0 for p in ax.patches)]
    assert boxed == [2, 2 + len(windows) + 1]  # the hit column (after the image column), both rows
    _png_ok(figures.save(fig, tmp_path / "grid.png"))


# ----------------------------------------------------------------------------- the driver on the shipped model


@pytest.fixture(scope="module")
def shipped():
    from negstudy.config import ModelConfig
    from negstudy.models import load_pipeline

    cfg = OmegaConf.structured(ModelConfig(name="shapes", path="builtin:shapes"))
    return NegativeSampler(load_pipeline(cfg, torch.device("cpu")), steps=30, three_branches=True)


def test_run_writes_all_four_tables(shipped, tmp_path):
    cfg = OmegaConf.create({
        "dataset": {"name": "one", "limit": None, "pairs": [{"prompt": "a box in the sky", "negative": "tree", "category": "object"}]},
        "seeds": [9], "batch_size": 4, "mechanisms": {"draws": 2, "energy_steps": [20], "thetas": [0.0, 0.5, 1.0]},
    })
    out = mech.run(cfg, shipped, tmp_path)
    n = shipped.n_calls
    tables = {name: pd.read_parquet(tmp_path / f"{name}.parquet") for name in ("inducing", "momentum", "neutralization", "energy")}
    ind = tables["inducing"]
    assert len(ind) == n and ind.step.tolist() == list(range(n)) and ind.D.iloc[0] == 0.0
    assert set(ind.columns) >= {"pair", "prompt", "negative", "seed", "present_without_negative", "D"}
    assert tables["momentum"].groupby("schedule").size().tolist() == [n - 1, n - 1]
    present = bool(ind.present_without_negative.iloc[0])
    neu = tables["neutralization"]
    assert (len(neu) == 2 * 3 * n) if present else neu.empty  # 2 schedules x inside/outside/all x steps
    if present:
        assert (neu.region_fraction > 0).all() and (tmp_path / "attention_grid.png").exists()
    en = tables["energy"]
    if len(en):  # the oracle confirmed a background and an object image for the seed
        assert len(en) == 3 * 2 and set(en.theta) == {0.0, 0.5, 1.0} and (en.error > 0).all()
        assert en.bg_source.iloc[0] in ("with_negative", "without_negative")
    assert list(en.columns) == list(out["energy"].columns)
    for name in ("inducing", "momentum"):
        _png_ok(tmp_path / f"{name}.png")


# ----------------------------------------------------------------------------- the author's definitions, beside ours


def _planted_state(step, pos, neg):
    from negstudy.sampler import StepState

    pos, neg = torch.tensor(pos).view(1, 1, 1, 4), torch.tensor(neg).view(1, 1, 1, 4)
    eps = {"positive": pos, "negative": neg, "empty": torch.zeros_like(pos)}
    return StepState(step=step, timestep=0, latents=torch.zeros_like(pos), eps=eps, guided=pos, branch=["negative"])


def test_l2_inducing_and_sign_momentum_on_planted_predictions(tiny_sampler):
    """Two planted steps of 4-entry predictions, where the author's and negstudy's definitions differ."""
    rec = mech.MechanismRecorder()
    tables = {}
    # always: eps_neg = (1, 0, 0, 0), eps_pos(0) = (1, 2, -0.1, 3) -> |proj|_2 = 1, RMS 1 / sqrt(4) = 0.5
    # never:  eps_pos(0) = (0.5, 2, -0.1, 3)                        -> |proj|_2 = 0.5, RMS 0.25
    for schedule, first in (("always", 1.0), ("never", 0.5)):
        rec.on_start(tiny_sampler, Batch(["a cat"], ["dog"], [0], [Always().plan(tiny_sampler.n_calls)]))
        rec.on_step(_planted_state(0, [first, 2.0, -0.1, 3.0], [1.0, 0.0, 0.0, 0.0]))
        rec.on_step(_planted_state(1, [first, 2.0, 0.1, 3.0], [1.0, 0.0, 0.0, 0.0]))  # one small entry flips sign
        rec.on_end(None)
        tables[schedule] = rec.table().assign(schedule=schedule, item=0)
    steps = pd.concat(tables.values(), ignore_index=True)
    d = mech.inducing(steps).set_index("step")
    assert d.loc[0, "proj_always"] == pytest.approx(0.5) and d.loc[0, "proj_always_l2"] == pytest.approx(1.0)
    assert d.loc[0, "D"] == pytest.approx(0.25)  # negstudy: RMS per entry
    assert d.loc[0, "D_l2"] == pytest.approx(0.5)  # the author's L2 norm: sqrt(4) x larger
    m = mech.momentum(steps).set_index("schedule")
    # raw vectors: (1 + 4 - 0.01 + 9) / 14.01; signs: (+1 +1 -1 +1) / 4
    assert m.loc["always", "m"] == pytest.approx(13.99 / 14.01)
    assert m.loc["always", "m_sign"] == pytest.approx(0.5)
    assert list(m.columns) == ["item", "step", "m", "m_sign"]
    assert torch.allclose(mech.sign_cosine(torch.tensor([[2.0, -3.0]]), torch.tensor([[0.1, -9.0]])),
                          torch.tensor([1.0], dtype=torch.float64))
    assert torch.allclose(mech.projection_l2(torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 0.0]])),
                          torch.tensor([3.0], dtype=torch.float64))


def test_paper_energy_barrier_uses_t100_the_empty_prompt_and_101_weights():
    s = NegativeSampler(tiny_pipeline(1, pixel_space=True), steps=10)
    rng = np.random.default_rng(1)
    bg, obj = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8), rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    z_bg, z_obj = mech.to_latents(s, bg), mech.to_latents(s, obj)
    paper = mech.paper_energy_barrier(s, z_bg, z_obj, draws=1, noise_seeds=[5], max_rows=128)
    assert len(paper) == 101 and paper.theta.nunique() == 101
    assert (paper.step == -1).all() and (paper.timestep == 100).all()
    assert torch.equal(s.encode("   "), s.encode(""))  # the author's "   " is the empty prompt
    # independently, at theta = 0.37: z_t = sqrt(abar_100) z + sqrt(1 - abar_100) eps, conditioned on "   "
    abar = float(s.scheduler.alphas_cumprod[100])
    noise = torch.randn((1, 3, 32, 32), generator=torch.Generator("cpu").manual_seed(5))
    z = 0.37 * z_bg[0] + 0.63 * z_obj[0]
    x = math.sqrt(abar) * z + math.sqrt(1 - abar) * noise
    with torch.no_grad():
        out = s.unet(x, 100, encoder_hidden_states=s.encode("   ")).sample
    expected = ((out - noise) ** 2).mean((1, 2, 3)).numpy()
    got = paper[paper.theta == 0.37].sort_values("draw").error.to_numpy()
    assert np.allclose(got, expected, rtol=1e-4)
    # negstudy's variant at a loop step (t = 901 for step 1 of 10) with the positive prompt: another number
    ours = mech.energy_barrier(s, ["a ball on the grass"], z_bg, z_obj, thetas=[0.37], steps=[1], draws=1, noise_seeds=[5])
    assert ours.timestep.iloc[0] != 100 and not np.allclose(ours.sort_values("draw").error.to_numpy(), got, rtol=1e-2)


def test_energy_variant_key_is_validated(tiny_model_dir):
    from hydra import compose, initialize_config_module

    from negstudy.checks import validate
    from negstudy.config import register_configs
    from negstudy.errors import ConfigError

    register_configs()
    with initialize_config_module(config_module="negstudy.conf", version_base="1.3"):
        base = [f"model.path={tiny_model_dir}", "evaluator=none", "+sweep=mechanisms", "hydra.mode=RUN"]
        cfg = compose(config_name="config", overrides=base + ["mechanisms.energy=both"])
        validate(cfg)
        assert cfg.mechanisms.energy == "both"
        bad = compose(config_name="config", overrides=base + ["mechanisms.energy=t100"])
        with pytest.raises(ConfigError) as err:
            validate(bad)
    assert str(err.value) == "mechanisms.energy='t100': allowed values are negstudy, paper, both"


def test_run_with_both_energy_variants(shipped, tmp_path):
    """mechanisms.energy=both through the driver (10 steps to keep it short: ~25 s)."""
    cfg = OmegaConf.create({
        "dataset": {"name": "one", "limit": None, "pairs": [{"prompt": "a box in the sky", "negative": "tree", "category": "object"}]},
        "seeds": [9], "batch_size": 4, "save_images": False,
        "mechanisms": {"draws": 1, "energy_steps": [5], "thetas": [0.0, 0.5, 1.0], "energy": "both"},
    })
    mech.run(cfg, NegativeSampler(shipped.pipe, steps=10, three_branches=True), tmp_path)
    en = pd.read_parquet(tmp_path / "energy.parquet")
    ind = pd.read_parquet(tmp_path / "inducing.parquet")
    assert np.allclose(ind.D_l2, ind.D * math.sqrt(3 * 32 * 32))  # the shapes model: 3 x 32 x 32 entries
    assert "m_sign" in pd.read_parquet(tmp_path / "momentum.parquet").columns
    if len(en):
        assert set(en.variant) == {"negstudy", "paper"}
        assert len(en[en.variant == "negstudy"]) == 3 and len(en[en.variant == "paper"]) == 101
        assert (en[en.variant == "paper"].timestep == 100).all()
