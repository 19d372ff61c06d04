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
from negstudy.schedules import FromStep, Never, Window
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
    with pytest.raises(ValueError, match=r"snapshots of steps \[2, 4\]"):
        shapes.generate(Batch([PROMPT] * 2, [NEG] * 2, [3, 3], [FromStep(4).plan(n)] * 2, resume=[snap, keep.states[0][4]]))
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
