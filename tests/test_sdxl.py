"""SDXL end to end on a tiny random SDXL (negstudy.tiny): parity with StableDiffusionXLPipeline, the
attention recorder on depth-2 transformer blocks and two tokenizers, the shared-prefix engine, and
every study from the command line with ``model=sdxl`` read by CLIP."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from negstudy.attention import AttentionRecorder, word_slots, word_token_slots
from negstudy.sampler import Batch, KeepStates, NegativeSampler
from negstudy.schedules import Always, FromStep, Never, Window
from negstudy.tiny import save_tiny_sdxl, tiny_sdxl_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from study_settings import STUDIES, WRITES  # noqa: E402

PROMPT, NEG = "a cat on the grass", "dog"


@pytest.fixture(scope="module")
def xl():
    """{scheduler: tiny StableDiffusionXLPipeline}: SDXL's own EulerDiscrete and DDIM."""
    return {name: tiny_sdxl_pipeline(0, scheduler=name) for name in ("euler", "ddim")}


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    """A saved tiny SDXL, like a real SDXL checkpoint: no shapes-world marker, so the studies read its
    (noise) images with the evaluator the command line names."""
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")


def reference(pipe, negative, steps=6, seed=7):
    return pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_parity_with_the_sdxl_pipeline(xl, scheduler):
    """always = the pipeline with the negative prompt; never = without one (zeros: force_zeros_for_empty_prompt)."""
    pipe = xl[scheduler]
    sampler = NegativeSampler(pipe, steps=6, fixed_rows=0)  # the pipeline's own kernel calls
    assert sampler.xl and sampler.n_calls == 6
    for schedule, negative in [(Always(), NEG), (Never(), None)]:
        ours = sampler.generate(Batch([PROMPT], [NEG], [7], [schedule.plan(6)]))
        diff = np.abs(ours - reference(pipe, negative)).max()
        print(f"{scheduler} {type(schedule).__name__}: max abs image difference {diff:.3g}")
        assert diff <= 1e-5, (scheduler, schedule)
    # the branches really differ: the negative prompt, and zeros against the encoded "" for the empty branch
    assert np.abs(reference(pipe, NEG) - reference(pipe, None)).max() > 1e-3
    assert np.abs(reference(pipe, "") - reference(pipe, None)).max() > 1e-3


def test_a_half_precision_vae_decodes_in_float32_as_the_pipeline():
    """SDXL's VAE overflows in fp16 (force_upcast): both decode in fp32, and the VAE stays fp16 afterwards."""
    pipe = tiny_sdxl_pipeline(0)
    pipe.vae.to(torch.float16)
    ours = NegativeSampler(pipe, steps=4, fixed_rows=0).generate(Batch([PROMPT], [NEG], [7], [Always().plan(4)]))
    assert pipe.vae.dtype == torch.float16
    assert np.abs(ours - reference(pipe, NEG, steps=4)).max() <= 1e-5


def test_encoding_follows_the_pipeline(xl):
    pipe = xl["euler"]
    sampler = NegativeSampler(pipe, steps=4)
    emb, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(sampler.encode(PROMPT), emb) and emb.shape == (1, 77, 64)  # both encoders, concatenated
    assert torch.equal(sampler.encode_pooled(PROMPT), pooled) and pooled.shape == (1, 32)
    assert not sampler.encode(None).any() and not sampler.encode_pooled(None).any()  # the empty branch: zeros
    assert sampler.encode("").abs().sum() > 0
    assert sampler.time_ids(2).tolist() == [[32, 32, 0, 0, 32, 32]] * 2  # original size, crop, target size
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:  # without force_zeros the empty branch is the encoded "", as in the pipeline: parity again
        plain = NegativeSampler(pipe, steps=6, fixed_rows=0)
        assert torch.equal(plain.encode(None), plain.encode(""))
        ours = plain.generate(Batch([PROMPT], [NEG], [7], [Never().plan(6)]))
        assert np.abs(ours - reference(pipe, None)).max() <= 1e-5
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)


def test_model_sdxl_loads_an_sdxl_pipeline(xl, xl_dir):
    """model=sdxl composes (hub id by default) and a local SDXL directory loads as StableDiffusionXLPipeline."""
    from diffusers import StableDiffusionXLPipeline
    from hydra import compose, initialize_config_module

    from negstudy.config import register_configs
    from negstudy.models import load_pipeline

    register_configs()
    with initialize_config_module(config_module="negstudy.conf", version_base="1.3"):
        default = compose(config_name="config", overrides=["model=sdxl"])
        cfg = compose(config_name="config", overrides=["model=sdxl", f"model.path={xl_dir}"])
    assert default.model.path == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.model.name == "sdxl"
    pipe = load_pipeline(cfg.model, torch.device("cpu"))
    assert type(pipe) is StableDiffusionXLPipeline and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    batch = Batch([PROMPT], [NEG], [2], [Always().plan(4)])
    loaded = NegativeSampler(pipe, steps=4).generate(batch)
    # the saved weights (the loaded text encoders may pick another attention kernel: float rounding apart)
    assert np.abs(loaded - NegativeSampler(xl["euler"], steps=4).generate(batch)).max() < 1e-5


def test_shared_prefix_engine_and_resume_on_sdxl(xl):
    """A from_step sweep as one batch (lanes split, pooled embeddings re-indexed) = each schedule alone."""
    pipe = xl["euler"]
    sampler = NegativeSampler(pipe, steps=5)
    n = sampler.n_calls
    plans = [FromStep(k).plan(n) for k in range(n + 1)] + [Window(1, 2).plan(n)]
    m = len(plans)
    prompts, negatives = [PROMPT] * (m - 1) + ["a dog on the sand"], [NEG] * (m - 1) + ["ball"]  # two texts: rows re-index
    rows = []
    handle = pipe.unet.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    keep = KeepStates([2])
    shared = sampler.generate(Batch(prompts, negatives, [3] * m, plans), [keep])
    shared_rows, rows[:] = sum(rows), []
    alone = np.concatenate([sampler.generate(Batch([p], [q], [3], [plan])) for p, q, plan in zip(prompts, negatives, plans)])
    handle.remove()
    assert np.abs(shared - alone).max() < 1e-5
    assert shared_rows < 0.75 * sum(rows)
    assert np.abs(shared[0] - shared[-2]).max() > 1e-3  # from step 0 vs never: the negative matters
    # continue the from-step-3 image from its lane's snapshot at step 2
    resumed = sampler.generate(Batch([PROMPT], [NEG], [3], [plans[3]], resume=[keep.states[3][2]]))
    assert np.array_equal(resumed[0], shared[3])


def test_attention_recorder_on_sdxl(xl):
    """Depth-2 transformer blocks, both branches, both tokenizers; recording leaves the images unchanged."""
    pipe = xl["euler"]
    sampler = NegativeSampler(pipe, steps=4)
    n = sampler.n_calls
    rec = AttentionRecorder(pipe.unet)  # down and up blocks
    assert len(rec.layers) == 6 and sum(".transformer_blocks.1.attn2" in name for name in rec.layers) == 3
    batch = Batch([PROMPT], ["a dog"], [1], [Always().plan(n)])
    plain = sampler.generate(batch)
    recorded = sampler.generate(batch, [rec])
    assert np.array_equal(plain, recorded)
    cat, dog = rec.maps(0, "positive", "cat").float(), rec.maps(0, "negative", "dog").float()
    assert cat.shape == dog.shape == (n, 16, 16)
    for m in (cat, dog):  # a mean of attention probabilities: finite, in [0, 1], not all zero
        assert torch.isfinite(m).all() and (m >= 0).all() and (m <= 1).all() and (m.mean((1, 2)) > 0).all()
    assert not torch.allclose(cat, dog)
    # the words' slots are disjoint and a position's probabilities over the 77 slots sum to 1: so do at most their maps
    total = sum(rec.maps(0, "positive", w).float() for w in ["a", "cat", "on", "the", "grass"])
    assert (total > 0).all() and (total <= 1 + 1e-3).all()
    energy = rec.energy(0, "negative")
    assert energy.shape == (n, 77) and torch.isfinite(energy).all()
    ratio = rec.strength()
    assert len(ratio) == n and np.isfinite(ratio.ratio).all() and (ratio.ratio > 0).all()
    # SDXL's tokenizers agree on every word's slots; a pipeline whose second tokenizer splits "cat" differently is refused
    slots = word_slots([pipe.tokenizer, pipe.tokenizer_2], PROMPT, "cat")
    assert slots == word_token_slots(pipe.tokenizer_2, PROMPT, "cat") and slots[0] == 2
    from negstudy.tokenizer import build_clip_tokenizer

    other = build_clip_tokenizer(["a", "on", "the", "grass"])  # "cat" becomes three character tokens
    with pytest.raises(ValueError, match="different token slots"):
        word_slots([pipe.tokenizer, other], PROMPT, "cat")


def test_energy_barrier_conditions_the_sdxl_unet(xl):
    """The mechanisms study calls the UNet itself: with SDXL's pooled embeddings and time ids."""
    from negstudy.studies import mechanisms as mech

    sampler = NegativeSampler(xl["euler"], steps=4)
    g = torch.Generator().manual_seed(0)
    z_bg, z_obj = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    table = mech.energy_barrier(sampler, [PROMPT], z_bg, z_obj, thetas=[0.0, 0.5, 1.0], steps=[1], draws=1)
    other = mech.energy_barrier(sampler, ["a dog on the sand"], z_bg, z_obj, thetas=[0.0, 0.5, 1.0], steps=[1], draws=1)
    assert len(table) == 3 and np.isfinite(table.error).all()
    assert not np.allclose(table.error, other.error)  # the prompt (and its pooled embedding) reaches the UNet


def test_every_study_runs_with_model_sdxl(xl_dir, tmp_path, monkeypatch, capsys):
    """Each +sweep= overlay with model=sdxl on the tiny SDXL, as typed on the command line: the main job
    as a real `python -m negstudy` multirun (the overlay's two shards), the others through the same
    Hydra entry point in this process (one `import diffusers` instead of five)."""
    from negstudy.__main__ import app

    assert set(STUDIES) == {p.stem for p in (Path(__file__).parents[1] / "conf" / "sweep").glob("*.yaml")}  # every overlay
    common = ["model=sdxl", f"model.path={xl_dir}", "logger=none", "save_images=false", "evaluator=clip",
              "evaluator.path=builtin:shapes_clip"]  # a real CLIP, small, on disk
    sweep = tmp_path / "critical_step"
    proc = subprocess.run([sys.executable, "-m", "negstudy", "+sweep=critical_step", *common, *STUDIES["critical_step"][:-1],
                           "dataset.limit=2", f"hydra.sweep.dir={sweep}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep summary: 2 done, 0 skipped, 0 failed" in proc.stdout
    assert (sweep / "report" / "report.html").exists() and len(pd.read_parquet(sweep / "0" / "ratio.parquet"))
    monkeypatch.chdir(tmp_path)
    for name, extra in STUDIES.items():
        if name == "critical_step":
            continue
        out = tmp_path / name
        monkeypatch.setattr(sys, "argv", ["negstudy", f"+sweep={name}", "hydra.mode=RUN", "dataset.shards=1", *common,
                                          *extra, f"hydra.run.dir={out}"])
        try:
            app()
        except SystemExit as err:  # the app exits non-zero on a failed job
            pytest.fail(f"{name}: exit {err.code}: {capsys.readouterr().err[-3000:]}")
        assert (out / "report" / "report.html").exists(), name
        assert "  name: sdxl\n" in (out / "config.yaml").read_text(), name
        assert len(pd.read_parquet(out / WRITES[name])), name
    screen = pd.read_parquet(tmp_path / "reverse_activation" / "reverse_screen.parquet")
    assert len(pd.read_parquet(tmp_path / "reverse_activation" / "reverse.parquet")) == 3 * min(1, int(screen.absent.sum()))  # k = 0, 2, 4
    # and the plain generation job under a windowed schedule
    out = tmp_path / "generate"
    monkeypatch.setattr(sys, "argv", ["negstudy", *common, "steps=4", "seeds=[0]", "dataset.limit=1", "schedule=window",
                                      "schedule.start=1", "schedule.end=2", f"hydra.run.dir={out}"])
    app()
    images, steps = pd.read_parquet(out / "images.parquet"), pd.read_parquet(out / "steps.parquet")
    assert images.model.tolist() == ["sdxl"] and steps.branch.tolist() == ["empty", "negative", "negative", "empty"]
