"""The sampler against diffusers' StableDiffusionPipeline, and its per-step branch logic."""

import numpy as np
import pytest
import torch

from negstudy.sampler import Batch, Hook, NegativeSampler
from negstudy.schedules import Always, FirstK, FromStep, Inject, Never, Window
from negstudy.tiny import tiny_pipeline

PROMPT, NEG = "a cat on the grass", "dog"


def reference(pipe, seed, negative=None, steps=8):
    px = pipe.vae is None
    out = pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(seed), output_type="latent" if px else "np").images
    return pipe.image_processor.postprocess(out, output_type="np") if px else out


@pytest.mark.parametrize("scheduler", ["pndm", "ddim"])
@pytest.mark.parametrize("pixel_space", [False, True])
def test_parity_with_diffusers(scheduler, pixel_space):
    pipe = tiny_pipeline(0, pixel_space=pixel_space, scheduler=scheduler)
    # fixed_rows=0: the pipeline's own kernel calls (fixed row blocks, the CPU default, change the last bits)
    sampler = NegativeSampler(pipe, steps=8, fixed_rows=0)
    n = sampler.n_calls
    assert n == (9 if scheduler == "pndm" else 8)
    for schedule, negative in [(Always(), NEG), (Never(), None)]:
        ours = sampler.generate(Batch([PROMPT], [NEG], [7], [schedule.plan(n)]))
        ref = reference(pipe, 7, negative)
        assert np.abs(ours - ref).max() <= 1e-5, (schedule, scheduler)


def test_batched_images_equal_single_images():
    """Batching over seeds, prompts and mixed schedules changes nothing beyond float noise."""
    pipe = tiny_pipeline(1)
    sampler = NegativeSampler(pipe, steps=6)
    n = sampler.n_calls
    plans = [Always().plan(n), Never().plan(n), Window(2, 4).plan(n), FirstK(3).plan(n)]
    prompts = [PROMPT, "a dog", PROMPT, "a red ball"]
    seeds = [0, 1, 2, 3]
    batched = sampler.generate(Batch(prompts, [NEG] * 4, seeds, plans))
    for j in range(4):
        single = sampler.generate(Batch([prompts[j]], [NEG], [seeds[j]], [plans[j]]))
        assert np.abs(batched[j] - single[0]).max() < 1e-4
    assert np.abs(batched[0] - batched[2]).max() > 1e-3  # the schedule matters


class Spy(Hook):
    def __init__(self):
        self.rows, self.states = [], []

    def before_unet(self, step, rows):
        self.rows.append(rows)

    def on_step(self, state):
        self.states.append(state)


def test_one_batched_call_per_step_with_the_branches_the_schedule_needs():
    pipe = tiny_pipeline(0)
    sampler = NegativeSampler(pipe, steps=6)
    n = sampler.n_calls
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    spy = Spy()
    sampler.generate(Batch([PROMPT] * 2, [NEG] * 2, [0, 1], [Window(2, 3).plan(n), Never().plan(n)]), [spy])
    handle.remove()
    assert len(calls) == n and all(c == 4 for c in calls)  # 2 images x 2 branches, one call a step
    assert spy.rows[2] == [(0, "negative"), (1, "empty"), (0, "positive"), (1, "positive")]
    assert spy.rows[0] == [(0, "empty"), (1, "empty"), (0, "positive"), (1, "positive")]
    assert [s.branch[0] for s in spy.states] == ["empty", "empty", "negative", "negative", "empty", "empty", "empty"]
    assert torch.isnan(spy.states[0].eps["negative"]).all()  # not computed there


def test_guidance_formula_and_three_branches_leave_the_image_unchanged():
    pipe = tiny_pipeline(0)
    two = NegativeSampler(pipe, steps=6)
    three = NegativeSampler(pipe, steps=6, three_branches=True)
    n = two.n_calls
    plan = Inject(steps=(2,), g=15.0).plan(n)
    spy = Spy()
    img3 = three.generate(Batch([PROMPT], [NEG], [4], [plan]), [spy])
    img2 = two.generate(Batch([PROMPT], [NEG], [4], [plan]))
    assert np.abs(img3 - img2).max() < 1e-4
    for state in spy.states:
        e = state.eps
        assert not any(torch.isnan(v).any() for v in e.values())
        expected = e["empty"] + 7.5 * (e["positive"] - e["empty"])
        if state.step == 2:
            expected = expected - 15.0 * (e["negative"] - e["empty"])
        torch.testing.assert_close(state.guided, expected)


def test_reverse_sign_injection_differs_from_plain_cfg():
    pipe = tiny_pipeline(0)
    sampler = NegativeSampler(pipe, steps=6)
    n = sampler.n_calls
    plain = sampler.generate(Batch([PROMPT], [NEG], [4], [Never().plan(n)]))
    pushed = sampler.generate(Batch([PROMPT], [NEG], [4], [Inject(steps=(1,), g=-20.0).plan(n)]))
    assert np.abs(plain - pushed).max() > 1e-3


def test_plan_length_must_match_the_loop():
    sampler = NegativeSampler(tiny_pipeline(0), steps=6)
    with pytest.raises(ValueError, match="covers 6 steps; the loop makes 7 UNet calls"):
        sampler.generate(Batch([PROMPT], [NEG], [0], [Always().plan(6)]))


def count_rows(pipe):
    rows = []
    handle = pipe.unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    return rows, handle


@pytest.mark.parametrize("scheduler", ["pndm", "ddim"])
@pytest.mark.parametrize("family", ["from_step", "first_k", "window"])
def test_shared_prefix_engine_equals_independent_runs(scheduler, family):
    pipe = tiny_pipeline(2, scheduler=scheduler)
    sampler = NegativeSampler(pipe, steps=6)
    n = sampler.n_calls
    if family == "from_step":
        schedules = [FromStep(k) for k in range(n + 1)]
    elif family == "first_k":
        schedules = [FirstK(k) for k in range(n + 1)]
    else:
        schedules = [Window(a, min(a + 2, n - 1)) for a in range(n)]
    plans = [sc.plan(n) for sc in schedules]
    m = len(plans)
    rows, handle = count_rows(pipe)
    shared = sampler.generate(Batch([PROMPT] * m, [NEG] * m, [5] * m, plans))
    shared_rows = sum(rows)
    rows.clear()
    alone = np.concatenate([sampler.generate(Batch([PROMPT], [NEG], [5], [p])) for p in plans])
    alone_rows = sum(rows)
    handle.remove()
    assert np.abs(shared - alone).max() < 1e-5
    assert alone_rows == 2 * n * m
    assert shared_rows < 0.75 * alone_rows  # prefixes ran once
    if family == "from_step":  # lanes at step i: never-lane + one per k <= i  ->  sum_i (i + 2) ... minus the k = n lane
        assert shared_rows == 2 * sum(min(i + 2, m) for i in range(n))


def test_shared_prefix_with_a_stochastic_scheduler():
    """Split lanes keep independent copies of their noise stream: same images as separate runs."""
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = tiny_pipeline(2)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    sampler = NegativeSampler(pipe, steps=5)
    plans = [FromStep(k).plan(sampler.n_calls) for k in (0, 2, 5)]
    shared = sampler.generate(Batch([PROMPT] * 3, [NEG] * 3, [1] * 3, plans))
    alone = np.concatenate([sampler.generate(Batch([PROMPT], [NEG], [1], [p])) for p in plans])
    assert np.abs(shared - alone).max() < 1e-5
