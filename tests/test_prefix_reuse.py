"""Branching a delayed negative from a kept trajectory (Batch.resume) gives the freshly generated image.

The critical-step study screens images without the negative, keeps their state at each start step
(:class:`negstudy.sampler.KeepStates`) and continues the delayed negative from there; these tests
compare such continued images with the same schedules run from x_T.
"""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from negstudy.config import ModelConfig
from negstudy.models import load_pipeline
from negstudy.records import to_uint8
from negstudy.sampler import Batch, Hook, KeepStates, NegativeSampler
from negstudy.schedules import FromStep, Never, StepPlan, Window
from negstudy.tiny import tiny_pipeline

PROMPT, NEG = "a ball on the grass", "sun"


@pytest.fixture(scope="module")
def shapes():
    pipe = load_pipeline(OmegaConf.structured(ModelConfig(name="shapes", path="builtin:shapes")), torch.device("cpu"))
    return NegativeSampler(pipe, steps=6)  # PNDM: 7 UNet calls


def test_branched_images_equal_fresh_ones_bit_for_bit(shapes):
    n, seeds = shapes.n_calls, [3, 4]
    keep = KeepStates([2, 5])
    plain = shapes.generate(Batch([PROMPT] * 2, [NEG] * 2, seeds, [Never().plan(n)] * 2), [keep])
    assert sorted(keep.states) == [0, 1] and sorted(keep.states[0]) == [2, 5]
    assert keep.states[0][5].rows  # PNDM's past predictions travel with the snapshot
    for k in (2, 5):
        plan = FromStep(k).plan(n)
        # both seeds in one batch, resumed; each fresh image alone (other batch sizes: fixed rows)
        branched = shapes.generate(Batch([PROMPT] * 2, [NEG] * 2, seeds, [plan] * 2,
                                         resume=[keep.states[0][k], keep.states[1][k]]))
        for j, seed in enumerate(seeds):
            fresh = shapes.generate(Batch([PROMPT], [NEG], [seed], [plan]))[0]
            assert np.array_equal(branched[j], fresh), (k, seed)
            assert not np.array_equal(branched[j], plain[j])  # the negative changed the image
    # a never-plan continued from a snapshot is the screened image itself
    again = shapes.generate(Batch([PROMPT], [NEG], [4], [Never().plan(n)], resume=[keep.states[1][2]]))
    assert np.array_equal(again[0], plain[1])


def test_snapshots_of_several_steps_join_one_call_at_their_steps(shapes):
    """One call continues snapshots of steps 5, 2 and 5: the images of step 5 join the loop at
    step 5 (their prefix is not recomputed), every image equals its fresh run bit for bit, and the call
    makes 2 rows an image a step from each image's own step, no more."""
    n, seeds = shapes.n_calls, [3, 4, 5]
    keep = KeepStates([2, 5])
    shapes.generate(Batch([PROMPT] * 3, [NEG] * 3, seeds, [Never().plan(n)] * 3), [keep])
    starts = [5, 2, 5]  # seed 3 from step 5, seed 4 from 2, seed 5 from 5
    plans = [FromStep(k).plan(n) for k in starts]
    rows = []  # the UNet's input rows a call, step by step (a torch hook: sampler hooks need one start step)
    handle = shapes.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        joined = shapes.generate(Batch([PROMPT] * 3, [NEG] * 3, seeds, plans,
                                       resume=[keep.states[j][k] for j, k in enumerate(starts)]))
    finally:
        handle.remove()
    assert rows == [2 * sum(k <= i for k in starts) for i in range(2, n)]  # [2, 2, 2, 6, 6] for 7 calls
    for j, seed in enumerate(seeds):
        fresh = shapes.generate(Batch([PROMPT], [NEG], [seed], [plans[j]]))[0]
        assert np.array_equal(joined[j], fresh), seed


def test_joining_lanes_carry_their_noise_streams_and_guider_state():
    """A stochastic scheduler (each seed's noise stream) and a stateful guider (DNG's posterior): images
    continued from snapshots of steps 1 and 3 in one call equal their fresh runs."""
    import diffusers

    from negstudy.guidance import DNG
    from negstudy.models import SCHEDULER_CLASSES

    pipe = tiny_pipeline(1)
    pipe.scheduler = getattr(diffusers, SCHEDULER_CLASSES["euler_a"]).from_config(pipe.scheduler.config)
    sampler = NegativeSampler(pipe, steps=5, guider=DNG())
    n, seeds, starts = sampler.n_calls, [1, 2], [3, 1]
    keep = KeepStates([1, 3])
    window = Window(0, 1).plan(n)  # the negative acts on step 0 of every trajectory: DNG's state moves
    sampler.generate(Batch(["a red ball"] * 2, ["a dog"] * 2, seeds, [window] * 2), [keep])
    plans = [StepPlan(window.negative | FromStep(k).plan(n).negative, window.inject) for k in starts]
    joined = sampler.generate(Batch(["a red ball"] * 2, ["a dog"] * 2, seeds, plans,
                                    resume=[keep.states[j][k] for j, k in enumerate(starts)]))
    for j, seed in enumerate(seeds):
        assert np.array_equal(joined[j], sampler.generate(Batch(["a red ball"], ["a dog"], [seed], [plans[j]]))[0]), seed


def test_branch_from_a_windowed_prefix_and_a_ddim_scheduler():
    """Snapshots of a lane that had the negative, on a scheduler without per-sample state."""
    sampler = NegativeSampler(tiny_pipeline(2, scheduler="ddim"), steps=5)
    n = sampler.n_calls
    keep = KeepStates([3])
    sampler.generate(Batch(["a red ball"], ["a dog"], [1], [Window(0, 2).plan(n)]), [keep])
    target = Window(0, 4).plan(n)  # agrees with Window(0, 2) on steps 0..2
    branched = sampler.generate(Batch(["a red ball"], ["a dog"], [1], [target], resume=[keep.states[0][3]]))
    fresh = sampler.generate(Batch(["a red ball"], ["a dog"], [1], [target]))
    assert np.array_equal(branched, fresh)


def test_a_snapshot_that_does_not_fit_is_refused(shapes):
    n = shapes.n_calls
    keep = KeepStates([2, 4])
    shapes.generate(Batch([PROMPT], [NEG], [3], [Never().plan(n)]), [keep])
    snap = keep.states[0][2]
    with pytest.raises(ValueError, match="differs from the snapshot's on steps before 2"):
        shapes.generate(Batch([PROMPT], [NEG], [3], [FromStep(1).plan(n)], resume=[snap]))
    with pytest.raises(ValueError, match="seed 3, image 'a ball on the grass' / 'sun' / seed 9"):
        shapes.generate(Batch([PROMPT], [NEG], [9], [FromStep(2).plan(n)], resume=[snap]))
    with pytest.raises(ValueError, match="hooks see every image at every step"):
        shapes.generate(Batch([PROMPT] * 2, [NEG] * 2, [3, 3], [FromStep(4).plan(n)] * 2, resume=[snap, keep.states[0][4]]),
                        [_Rows()])
    with pytest.raises(ValueError, match="another sampler"):
        NegativeSampler(shapes.pipe, steps=8).generate(Batch([PROMPT], [NEG], [3], [FromStep(2).plan(9)], resume=[snap]))


class _Rows(Hook):
    """Counts the UNet rows of the generate calls it sees."""

    def __init__(self):
        self.rows = 0

    def before_unet(self, step, rows):
        self.rows += len(rows)


def test_pairs_sharing_a_prompt_share_one_screen_image_and_its_states(shapes, monkeypatch):
    """The screen generates each (prompt, seed) once whatever the negatives (the never schedule uses
    none): three pairs on one prompt cost one image a seed, the image equals a separate run's bit for
    bit, and its kept states continue each pair's own delayed negative into the fresh image."""
    from negstudy.studies import screen_without_negative

    n, seeds = shapes.n_calls, [3, 4]
    negatives = ["sun", "kite", "noisy"]
    items = [(neg, s) for neg in negatives for s in seeds]
    counter = _Rows()
    generate = shapes.generate
    monkeypatch.setattr(shapes, "generate", lambda batch, hooks=(): generate(batch, [*hooks, counter]))
    found = screen_without_negative(shapes, None, [PROMPT] * len(items), [neg for neg, _ in items],
                                    ["object"] * len(items), [s for _, s in items], 8, keep=[2])
    monkeypatch.undo()
    assert counter.rows == 2 * n * len(seeds)  # two seeds: 2 rows a step each, not six images' worth
    alone = shapes.generate(Batch([PROMPT], ["sun"], [4], [Never().plan(n)]))[0]
    for (neg, seed), screened in zip(items, found):
        assert np.array_equal(screened.image, found[seeds.index(seed)].image)
        assert sorted(screened.states) == [2]
    assert np.array_equal(found[1].image, to_uint8(alone[None])[0])  # seed 4 of the first pair
    # each pair continues the shared state with its own negative: the fresh image of its own plan
    plan = FromStep(2).plan(n)
    for neg in ("kite", "noisy"):
        i = items.index((neg, 4))
        branched = shapes.generate(Batch([PROMPT], [neg], [4], [plan], resume=[found[i].states[2]]))
        assert np.array_equal(branched[0], shapes.generate(Batch([PROMPT], [neg], [4], [plan]))[0]), neg
