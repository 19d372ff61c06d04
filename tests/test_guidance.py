"""Guiders (negstudy.guidance) on tiny models: each against its paper's formula written out here,
every guider with the shared-prefix engine, and parity with diffusers for every offered scheduler."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from negstudy.errors import ConfigError
from negstudy.guidance import APG, CFG, DNG, NAG, TCFG, PerpNeg, from_config
from negstudy.sampler import Batch, Hook, NegativeSampler
from negstudy.schedules import Always, FirstK, FromStep, Inject, Never, Window
from negstudy.tiny import tiny_pipeline

PROMPT, NEG = "a cat on the grass", "dog"


class Capture(Hook):
    def __init__(self):
        self.states = []

    def on_step(self, state):
        self.states.append(state)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(3, pixel_space=True)


def run(pipe, guider, schedule=Always(), steps=6, seed=4, negative=NEG, three=False):
    sampler = NegativeSampler(pipe, steps=steps, guider=guider, three_branches=three, fixed_rows=0)
    hook = Capture()
    images = sampler.generate(Batch([PROMPT], [negative], [seed], [schedule.plan(sampler.n_calls)]), [hook])
    return images, hook.states, sampler


def f64(t):
    return t[0].double()


def test_perp_neg_subtracts_only_the_perpendicular_component(pipe):
    w = 3.0
    _, states, _ = run(pipe, PerpNeg(weight=w), three=True)
    for st in states:
        pos, neg, empty = f64(st.eps["positive"]), f64(st.eps["negative"]), f64(st.eps["empty"])
        d_pos, d_neg = (pos - empty).flatten(), (neg - empty).flatten()
        perp = d_neg - (d_neg @ d_pos) / (d_pos @ d_pos) * d_pos  # Armandpour et al. 2023, eq. for eps_neg^perp
        expected = empty.flatten() + 7.5 * d_pos - w * perp
        assert torch.allclose(f64(st.guided).flatten(), expected, atol=1e-5)
    # a negative that IS the prompt has no perpendicular part: Perp-Neg then equals plain CFG with the empty prompt
    same, _, _ = run(pipe, PerpNeg(), negative=PROMPT)
    plain, _, _ = run(pipe, CFG(), schedule=Never(), negative=PROMPT)
    ordinary, _, _ = run(pipe, CFG(), negative=PROMPT)
    assert np.abs(same - plain).max() < 1e-4
    assert np.abs(ordinary - plain).max() > 1e-2  # while ordinary negative prompting with it cancels the prompt


def test_dng_posterior_follows_the_papers_update(pipe):
    g = DNG(scale=5.0, prior=0.01, temperature=0.2, offset=2e-4, p_min=1e-6, p_max=0.8)
    _, states, sampler = run(pipe, g, steps=8, three=True)
    abar = sampler.scheduler.alphas_cumprod.double()
    p = 0.01
    for k, st in enumerate(states):
        pos, neg, empty = f64(st.eps["positive"]), f64(st.eps["negative"]), f64(st.eps["empty"])
        expected = empty + 7.5 * (pos - empty) - 5.0 * p / (1 - p) * (neg - empty)
        assert torch.allclose(f64(st.guided), expected, atol=1e-5), k
        if k + 1 < len(states):  # Algorithm 1: Bayes update from the two predicted means at x_{t-1}
            x_t, x_next = f64(st.latents), f64(states[k + 1].latents)
            a_t, a_n = abar[st.timestep], abar[states[k + 1].timestep]
            if a_n > a_t:
                alpha = a_t / a_n
                var = (1 - a_n) / (1 - a_t) * (1 - alpha)
                mu_neg = (x_t - (1 - alpha) / torch.sqrt(1 - a_t) * neg) / torch.sqrt(alpha)
                mu_emp = (x_t - (1 - alpha) / torch.sqrt(1 - a_t) * empty) / torch.sqrt(alpha)
                diff = ((x_next - mu_neg) ** 2).sum() - ((x_next - mu_emp) ** 2).sum()
                p = float(min(max(p * torch.exp((-0.2 * diff + 2e-4) / (2 * var)), 1e-6), 0.8))
    assert p != 0.01  # the posterior moved


class ReferenceNAG:
    """NAG as an attention processor (the authors' way): both contexts in one call, combined before to_out."""

    def __init__(self, negative, phi, tau, alpha):
        self.negative, self.phi, self.tau, self.alpha = negative, phi, tau, alpha

    def attend(self, attn, h, context):
        b = h.shape[0]
        q, k, v = attn.to_q(h), attn.to_k(context), attn.to_v(context)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * d)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        z_pos = self.attend(attn, hidden_states, encoder_hidden_states)
        z_neg = self.attend(attn, hidden_states, self.negative)
        z = z_pos * self.phi - z_neg * (self.phi - 1)
        scale = z.abs().sum(-1, keepdim=True) / z_pos.abs().sum(-1, keepdim=True)
        z = z * torch.minimum(scale, torch.full_like(scale, self.tau)) / scale
        z = z * self.alpha + z_pos * (1 - self.alpha)
        return attn.to_out[1](attn.to_out[0](z))


def test_nag_matches_an_attention_processor_implementation(pipe):
    nag = NAG(phi=5.0, tau=2.5, alpha=0.25)
    _, states, sampler = run(pipe, nag, steps=4)
    assert torch.isnan(states[0].eps["negative"]).all()  # no negative UNet branch: the negative acts in attention
    st = states[1]
    unet = pipe.unet
    original = dict(unet.attn_processors)
    nag.remove()  # the hooks off: the reference processor alone
    try:
        procs = {name: (ReferenceNAG(sampler.encode(NEG), 5.0, 2.5, 0.25) if name.endswith("attn2.processor") else p)
                 for name, p in original.items()}
        unet.set_attn_processor(procs)
        with torch.no_grad():
            ref = unet(sampler.scheduler.scale_model_input(st.latents, st.timestep), st.timestep,
                       encoder_hidden_states=sampler.encode(PROMPT)).sample
    finally:
        unet.set_attn_processor(original)
    assert torch.allclose(st.eps["positive"], ref, atol=1e-5)
    # phi = 1 is no guidance in attention: plain CFG with the empty prompt
    one, _, _ = run(pipe, NAG(phi=1.0))
    plain, _, _ = run(pipe, CFG(), schedule=Never())
    five, _, _ = run(pipe, NAG())
    assert np.abs(one - plain).max() < 1e-4 and np.abs(five - plain).max() > 1e-3


def test_apg_without_rescale_and_with_eta_one_is_cfg_and_tcfg_runs(pipe):
    ours, _, _ = run(pipe, APG(rescale=0.0, eta=1.0))  # no norm cap, the parallel part kept: CFG itself
    cfg, _, _ = run(pipe, CFG())
    assert np.abs(ours - cfg).max() < 1e-4
    capped, _, _ = run(pipe, APG())
    assert np.abs(capped - cfg).max() > 1e-3
    tcfg, _, _ = run(pipe, TCFG())
    assert np.isfinite(tcfg).all() and np.abs(tcfg - cfg).max() > 1e-3


@pytest.mark.parametrize("name", ["cfg", "perp_neg", "nag", "dng", "apg", "tcfg"])
def test_every_guider_with_every_schedule_gives_the_same_images_with_shared_prefixes(pipe, name):
    """Any guider x any schedule (WHEN x HOW), sharing prefixes in one call: the images of separate runs."""
    guider = from_config(OmegaConf.load(f"conf/guidance/{name}.yaml"))
    sampler = NegativeSampler(pipe, steps=5, guider=guider)
    n = sampler.n_calls
    schedules = [FromStep(0), FromStep(2), Window(1, 3), FirstK(2), Inject((2,), g=5.0), Never()]
    plans = [sc.plan(n) for sc in schedules]
    shared = sampler.generate(Batch([PROMPT] * len(plans), [NEG] * len(plans), [5] * len(plans), plans))
    alone = np.concatenate([sampler.generate(Batch([PROMPT], [NEG], [5], [p])) for p in plans])
    assert np.abs(shared - alone).max() < 1e-5
    assert np.abs(shared[0] - shared[-1]).max() > 1e-4  # the negative acted


def test_step_table_logs_the_direction_the_guider_used(pipe):
    """Never + three branches: eps_neg is computed but CFG used eps_empty; the direction says so."""
    _, states, _ = run(pipe, CFG(), schedule=Never(), three=True)
    for st in states:
        assert torch.allclose(st.direction, st.eps["positive"] - st.eps["empty"])
        assert not torch.allclose(st.direction, st.eps["positive"] - st.eps["negative"])


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp", "euler_a", "dpmpp_sde"])
def test_parity_with_diffusers_for_every_offered_scheduler(scheduler):
    """pndm and ddim: tests/test_sampler.py. Stochastic ones continue each seed's stream as diffusers does."""
    import diffusers

    from negstudy.models import SCHEDULER_CLASSES, SCHEDULER_OPTIONS

    pipe = tiny_pipeline(0)
    cls = getattr(diffusers, SCHEDULER_CLASSES[scheduler])
    pipe.scheduler = cls.from_config({**pipe.scheduler.config, **SCHEDULER_OPTIONS.get(scheduler, {})})
    sampler = NegativeSampler(pipe, steps=6, fixed_rows=0)
    for schedule, negative in [(Always(), NEG), (Never(), None)]:
        ours = sampler.generate(Batch([PROMPT], [NEG], [7], [schedule.plan(sampler.n_calls)]))
        ref = pipe(PROMPT, negative_prompt=negative, num_inference_steps=6, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(7), output_type="np").images
        assert np.abs(ours - ref).max() <= 1e-5, (scheduler, schedule)


def test_bad_guidance_config_is_one_line_naming_the_key():
    cases = [
        ({"_target_": "negstudy.guidance.PerpNeg", "weight": -1}, "guidance.weight=-1"),
        ({"_target_": "negstudy.guidance.NAG", "phi": 0.5}, "guidance.phi=0.5"),
        ({"_target_": "negstudy.guidance.DNG", "prior": 0.9}, "guidance.prior=0.9"),
        ({"_target_": "negstudy.guidance.DiffusersGuider", "method": "PerturbedAttentionGuidance"}, "guidance.method="),
        ({"_target_": "negstudy.guidance.DiffusersGuider", "method": "Nope"}, "guidance.method='Nope'"),
        ({"_target_": "negstudy.guidance.APG", "momentum": 0.5}, "momentum"),
        ({"_target_": "negstudy.schedules.Always"}, "not a negstudy.guidance.Guider"),
    ]
    for node, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")) as err:
            from_config(OmegaConf.create(node))
        assert "\n" not in str(err.value)


def test_guidance_from_the_command_line(tmp_path):
    """``guidance=dng schedule=window`` as a user types it: the step table logs DNG's direction."""
    import subprocess
    import sys

    import pandas as pd

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "negstudy", "guidance=dng", "schedule=window", "schedule.start=1",
                           "schedule.end=3", "steps=4", "seeds=[0]", "dataset.limit=1", "logger=none", "evaluator=none",
                           f"hydra.run.dir={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = pd.read_parquet(out / "steps.parquet")
    assert steps.branch.tolist() == ["empty", "negative", "negative", "negative", "empty"]
    assert (steps.guidance_norm > 0).all()
    bad = subprocess.run([sys.executable, "-m", "negstudy", "guidance=dng", "guidance.prior=0.9", "logger=none",
                          f"hydra.run.dir={tmp_path / 'bad'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "guidance.prior=0.9" in bad.stderr


def test_the_docs_guider_example_plugs_in(pipe, tmp_path, monkeypatch):
    """The worked example of docs/extending.md, as written there: one module plus its YAML node."""
    import re
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "extending.md").read_text()
    code = re.search(r"```python\n(import torch\n\nfrom negstudy.guidance import Guidance, Guider.*?)```", page, re.S).group(1)
    (tmp_path / "scaled_neg.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    guider = from_config(OmegaConf.create({"_target_": "scaled_neg.ScaledNegative", "c": 2.0}))
    _, states, _ = run(pipe, guider, steps=4)
    for st in states:
        pos, neg, empty = f64(st.eps["positive"]), f64(st.eps["negative"]), f64(st.eps["empty"])
        assert torch.allclose(f64(st.guided), empty + 7.5 * (pos - empty) - 2.0 * (neg - empty), atol=1e-5)
