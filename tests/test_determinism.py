"""Same config and seed, same bytes: PNGs and tables do not depend on the batch size on the CPU.

Before :class:`negstudy.sampler.FixedRows`, the shipped model's PNGs differed by one grey level
between batch sizes 1, 3, 8 and 16 (14-18 of 24 images, 30 steps) and steps.parquet's norms by
up to 3e-3: CPU convolution and GEMM kernels round differently for different row counts.
"""

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

from negstudy import generate
from negstudy.config import register_configs
from negstudy.sampler import Batch, FixedRows, NegativeSampler, halve_on_oom
from negstudy.schedules import FromStep

register_configs()

# 2 pairs x 3 seeds of the shipped shapes model, short loop (9 UNet calls): ~3 s per job
JOB = ["steps=8", "seeds=[0,1,2]", "dataset.limit=2", "evaluator=oracle", "logger=none", "device=cpu"]


def job(out, batch_size):
    with initialize_config_module(config_module="negstudy.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=JOB + [f"batch_size={batch_size}"])
    generate.run(cfg, out)
    return out


def files(out):
    """Relative path -> bytes of every PNG and table a job wrote."""
    paths = sorted(out.glob("images/*.png")) + [out / "images.parquet", out / "steps.parquet"]
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in paths}


@pytest.fixture(scope="module")
def shapes_pipe():
    from omegaconf import OmegaConf

    from negstudy.config import ModelConfig
    from negstudy.models import load_pipeline

    return load_pipeline(OmegaConf.structured(ModelConfig(name="shapes", path="builtin:shapes")), torch.device("cpu"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return files(job(tmp_path_factory.mktemp("det") / "bs6", 6))


def test_png_and_table_bytes_do_not_depend_on_the_batch_size(reference, tmp_path):
    assert len([k for k in reference if k.endswith(".png")]) == 6
    for batch_size in (1, 4):  # 4: batches of 4 and 2 images
        got = files(job(tmp_path / f"bs{batch_size}", batch_size))
        assert got.keys() == reference.keys()
        assert [k for k in got if got[k] != reference[k]] == [], f"batch_size={batch_size}"
    steps = pd.read_parquet(tmp_path / "bs1" / "steps.parquet")
    assert len(steps) == 6 * 9 and steps.image_id.is_monotonic_increasing


def test_fixed_rows_make_a_row_independent_of_its_batch(shapes_pipe):
    """The mechanism, on the shipped UNet: one row's prediction alone, in a batch, at any position."""
    sampler = NegativeSampler(shapes_pipe, steps=8)
    assert sampler.fixed_rows == 8  # the CPU default for this small UNet
    unet, gen = sampler.unet, torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 32, 32, generator=gen)
    cond = torch.randn(5, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad(), FixedRows(8):
        whole = unet(x, 500, encoder_hidden_states=cond).sample
        alone = unet(x[3:4], 500, encoder_hidden_states=cond[3:4]).sample
        order = [3, 0, 4]
        moved = unet(x[order], 500, encoder_hidden_states=cond[order]).sample
    assert torch.equal(whole[3], alone[0]) and torch.equal(whole[3], moved[0]) and torch.equal(whole[4], moved[2])


def test_shared_prefix_lanes_equal_independent_runs_bit_for_bit(shapes_pipe):
    sampler = NegativeSampler(shapes_pipe, steps=8)
    n = sampler.n_calls
    plans = [FromStep(k).plan(n) for k in (0, 4, n)]
    shared = sampler.generate(Batch(["a ball on the grass"] * 3, ["sun"] * 3, [3] * 3, plans))
    for j, plan in enumerate(plans):
        assert np.array_equal(shared[j], sampler.generate(Batch(["a ball on the grass"], ["sun"], [3], [plan]))[0])


# ----------------------------------------------------------------------------- out of memory


class OutOfMemoryAbove:
    """A UNet forward pre-hook that fails like CUDA does when a call holds more than ``rows`` rows.

    It fails at the third such call in a row, so the failed batch has run steps 0 and 1 first (and
    its hooks have seen them).
    """

    def __init__(self, rows):
        self.rows, self.calls, self.streak = rows, [], 0

    def __call__(self, module, args):
        n = args[0].shape[0]
        self.calls.append(n)
        self.streak = self.streak + 1 if n > self.rows else 0
        if self.streak == 3:
            self.streak = 0
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} rows (test)")


@pytest.fixture
def oom_above(monkeypatch):
    """Install an :class:`OutOfMemoryAbove` on the UNet of every sampler the job builds."""
    hooks = []

    def install(rows):
        build = generate.build_sampler

        def build_with_hook(cfg):
            sampler = build(cfg)
            hook = OutOfMemoryAbove(rows)
            sampler.unet.register_forward_pre_hook(hook)
            hooks.append(hook)
            return sampler

        monkeypatch.setattr(generate, "build_sampler", build_with_hook)
        return hooks

    return install


def test_out_of_memory_halves_the_batch_and_changes_no_byte(reference, oom_above, tmp_path, caplog):
    hooks = oom_above(4)  # 2 images (x 2 branches) fit, 3 do not
    with caplog.at_level(logging.WARNING, logger="negstudy"):
        got = files(job(tmp_path / "oom", 6))
    assert [k for k in reference if got[k] != reference[k]] == []
    calls = hooks[0].calls
    assert calls[:6] == [12] * 3 + [6] * 3  # 6 images fail at step 2, then 3, ...
    assert calls[6:] == [2] * 6 * 9  # ... then one image at a time to the end (3 // 2 = 1)
    assert "out of memory with a batch of 6; retrying with 3" in caplog.text
    assert "out of memory with a batch of 3; retrying with 1" in caplog.text


def test_out_of_memory_with_one_image_fails_with_a_clear_message(oom_above, tmp_path):
    oom_above(1)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"out of memory with a batch of 1 \(tried 6 down to 1 by halving\)"):
        job(tmp_path / "fail", 6)
    assert not (tmp_path / "fail" / "images.parquet").exists()


def test_halving_keeps_the_smaller_size_and_every_item_once():
    tried = []

    def run(batch):
        tried.append(len(batch))
        if len(batch) > 3:
            raise torch.cuda.OutOfMemoryError("test")
        return [x * 10 for x in batch]

    out = list(halve_on_oom(list(range(11)), 16, run))
    assert tried == [11, 5, 2, 2, 2, 2, 2, 1]  # 16 -> the 11 items; halved from the failed batch's length
    assert [b for b, _ in out] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]]
    assert [y for _, r in out for y in r] == [x * 10 for x in range(11)]
    assert list(halve_on_oom([], 4, run)) == []
    with pytest.raises(ValueError):  # other errors pass through untouched
        list(halve_on_oom([1], 4, lambda b: (_ for _ in ()).throw(ValueError("no"))))


def test_bf16_autocast_keeps_images_independent_of_the_batch():
    """autocast=bf16 changes the images (other rounding) but, with fixed rows, not with the batch."""
    from negstudy.schedules import Always
    from negstudy.tiny import tiny_pipeline

    pipe = tiny_pipeline(0)
    fast, exact = NegativeSampler(pipe, steps=5, autocast="bf16"), NegativeSampler(pipe, steps=5)
    plans = [Always().plan(fast.n_calls)] * 3
    batch = Batch(["a red ball", "a dog", "a red ball"], ["a dog"] * 3, [0, 1, 2], plans)
    together = fast.generate(batch)
    for j in range(3):
        alone = fast.generate(Batch([batch.prompts[j]], ["a dog"], [batch.seeds[j]], [plans[j]]))
        assert np.array_equal(together[j], alone[0])
    assert together.dtype == np.float32 and not np.array_equal(together, exact.generate(batch))
    with pytest.raises(ValueError, match="autocast='fp8'"):
        NegativeSampler(pipe, steps=5, autocast="fp8")
