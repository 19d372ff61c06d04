"""Cross-attention reductions against hand-computed examples, and the recorder on the tiny model."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from negstudy.attention import (
    AttentionRecorder,
    daam_heat_map,
    daam_slot_energy,
    daam_upsample,
    heat_map,
    iou,
    latent_grid,
    mass_in_mask,
    select_layers,
    slot_energy,
    strength_ratio,
    word_token_slots,
)
from negstudy.sampler import Batch, NegativeSampler
from negstudy.schedules import Always, Window
from negstudy.tiny import tiny_pipeline

# 1-D bilinear (align_corners=False) weights from 2 to 4 samples: source coords -0.25, 0.25, 0.75, 1.25
M_2_TO_4 = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


# ----------------------------------------------------------------------------- token slots


def test_word_token_slots(pipe):
    tok = pipe.tokenizer
    assert word_token_slots(tok, "a cat on the grass", "cat") == [2]
    assert word_token_slots(tok, "A Cat on the grass", "cat") == [2]  # case-insensitive
    assert word_token_slots(tok, "a cat and a dog", "a") == [1, 4]  # every occurrence
    assert word_token_slots(tok, "a cat", "dog") == []
    # "eiffel" and "tower" are not in the tiny vocabulary: 6 and 5 character tokens after "a cat ,"
    assert word_token_slots(tok, "a cat, Eiffel tower", "Eiffel Tower") == list(range(4, 15))
    assert word_token_slots(tok, "a cat, Eiffel tower", "tower") == list(range(10, 15))
    assert word_token_slots(tok, "a watchtower", "tower") == []  # whole words only
    assert word_token_slots(tok, "grass, sky", "grass") == [1]  # the comma is not part of the word


def test_word_token_slots_drop_what_the_encoder_truncates(pipe):
    prompt = " ".join(["cat"] * 74 + ["dog", "dog"])  # 76 words: the second dog falls off slot 75
    assert word_token_slots(pipe.tokenizer, prompt, "dog") == [75]
    ids = pipe.tokenizer(prompt, truncation=True, max_length=77).input_ids
    assert ids[75] == pipe.tokenizer("dog", add_special_tokens=False).input_ids[0]


# ----------------------------------------------------------------------------- reductions


def test_latent_grid():
    assert latent_grid(4096, (64, 64)) == (64, 64)
    assert latent_grid(64, (64, 64)) == (8, 8)
    assert latent_grid(30, (9, 12)) == (5, 6)  # stride-2 convs round up
    with pytest.raises(ValueError):
        latent_grid(50, (64, 64))


def test_slot_energy_hand_example():
    # one head, a 2x2 layer, slot 0 = [[1, 0], [0, 0]], slot 1 = 0.5 everywhere; latents 4x4
    probs = torch.zeros(1, 4, 2)
    probs[0, 0, 0] = 1.0
    probs[0, :, 1] = 0.5
    e = slot_energy(probs, (4, 4))
    # up(slot 0) = m m^T with m = (1, .75, .25, 0): mean square = (1 + .5625 + .0625)^2 / 16
    assert e[0].item() == pytest.approx(1.625**2 / 16)
    assert e[1].item() == pytest.approx(0.25)  # a constant map stays constant
    two_heads = torch.cat([probs, 2 * probs])  # heads are summed: 1 + 4 times
    assert slot_energy(two_heads, (4, 4))[0].item() == pytest.approx(5 * 1.625**2 / 16)
    same_size = slot_energy(probs, (2, 2))  # no upsampling: plain mean of squares
    assert same_size[0].item() == pytest.approx(0.25)


def test_slot_energy_equals_explicit_upsampling():
    torch.manual_seed(0)
    probs = torch.rand(3, 5, 8 * 6, 7).softmax(-1)  # (batch, heads, 8x6 grid, 7 slots)
    up = F.interpolate(probs.permute(0, 1, 3, 2).reshape(3, 35, 8, 6), size=(16, 11), mode="bilinear",
                       align_corners=False)  # 8x6 is the grid of 16x11 latents
    explicit = (up**2).mean((-2, -1)).reshape(3, 5, 7).sum(1)
    torch.testing.assert_close(slot_energy(probs, (16, 11)), explicit, rtol=1e-5, atol=1e-7)


def test_heat_map_hand_example():
    probs = torch.zeros(2, 4, 3)  # 2 heads, 2x2 grid, 3 slots
    probs[:, :, 0] = 7.0  # slot 0 (BOS) is not asked for
    probs[0, 0, 1] = 2.0
    probs[1, 0, 2] = 2.0  # mean over heads and slots 1, 2 -> [[1, 0], [0, 0]]
    m = M_2_TO_4[:, 0]
    torch.testing.assert_close(heat_map(probs, [1, 2], (4, 4)), torch.outer(m, m))
    torch.testing.assert_close(heat_map(probs, [1, 2], (2, 2)), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert (heat_map(-probs, [1, 2], (4, 4)) == 0).all()  # clamped at 0


def test_strength_ratio():
    np.testing.assert_allclose(strength_ratio([1.0, 2.0, np.nan], [2.0, 2.0, 1.0]), [0.5, 1.0, np.nan])


def test_mass_in_mask_and_iou():
    heat = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = np.array([[True, False], [False, True]])
    assert mass_in_mask(heat, mask) == pytest.approx(0.5)
    # >= 0.5 * 4 keeps {2, 3, 4}: intersection {4}, union all 4 cells
    assert iou(heat, mask) == pytest.approx(0.25)
    assert iou(heat, mask, threshold=0.8) == pytest.approx(0.5)  # keeps {4}
    assert math.isnan(mass_in_mask(torch.zeros(2, 2), mask))
    assert iou(torch.zeros(2, 2), mask) == 0.0
    with pytest.raises(ValueError, match="resize the mask"):
        mass_in_mask(heat, np.ones((4, 4), bool))


def test_select_layers(pipe):
    names = list(pipe.unet.attn_processors)
    down_up = select_layers(names)
    assert len(down_up) == 3 and all("attn2" in n and not n.startswith("mid") for n in down_up)
    assert len(select_layers(names, "all")) == 4
    assert select_layers(names, ["up_blocks.1.attentions.1"]) == ["up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor"]
    with pytest.raises(ValueError):
        select_layers(names, "mid")
    with pytest.raises(ValueError):
        select_layers(names, ["nothing"])


# ----------------------------------------------------------------------------- the recorder

PROMPTS, NEGS = ["a cat on the grass", "a dog"], ["dog", "Eiffel tower"]


def test_recorder_three_branches_shapes_and_identical_pixels(pipe):
    sampler = NegativeSampler(pipe, steps=6, three_branches=True)
    n, (h, w) = sampler.n_calls, sampler.latent_shape[1:]
    batch = Batch(PROMPTS, NEGS, [0, 1], [Always().plan(n)] * 2)
    before = dict(pipe.unet.attn_processors)
    off = sampler.generate(batch)
    rec = AttentionRecorder(pipe.unet, layers="all")  # includes the 8x8 mid block: upsampled
    with rec:
        now = pipe.unet.attn_processors
        for name, proc in now.items():
            assert (proc is before[name]) == ("attn2" not in name), name
        on = sampler.generate(batch, [rec])
    assert np.abs(on - off).max() == 0.0
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)

    table = rec.ratio_table()
    for image in (0, 1):
        for branch in ("negative", "empty", "positive"):
            part = table[(table.image == image) & (table.branch == branch)]
            assert sorted(part[part.variant == "all_tokens"].step) == list(range(n))
            assert (part.value > 0).all()
            assert (part.variant == "word_tokens").sum() == (0 if branch == "empty" else n)
    assert rec.words_of(0, "positive") == ["a", "cat", "on", "the", "grass"]
    assert rec.words_of(1, "negative") == ["eiffel", "tower", "eiffel tower"]
    assert rec.words_of(0, "empty") == []
    cat = rec.maps(0, "positive", "cat")
    assert cat.shape == (n, h, w) and cat.dtype == torch.float16
    assert torch.isfinite(cat).all() and (cat >= 0).all() and (cat > 0).any()
    phrase = rec.maps(1, "negative", "Eiffel Tower").float()
    parts = (6 * rec.maps(1, "negative", "eiffel").float() + 5 * rec.maps(1, "negative", "tower").float()) / 11
    torch.testing.assert_close(phrase, parts, atol=2e-3, rtol=2e-3)  # token-weighted mean, fp16 storage
    with pytest.raises(KeyError, match="kept"):
        rec.maps(0, "negative", "cat")

    # bytes: per image, branch and step 77 float32 energies; per kept word and step an h x w float16 map
    words = sum(len(rec.words_of(i, b)) for i in (0, 1) for b in ("negative", "empty", "positive"))
    assert rec.nbytes() == 2 * 3 * n * 77 * 4 + words * n * h * w * 2

    s = rec.strength()
    e = {b: rec.energy(1, b).mean(1).numpy() for b in ("negative", "positive")}
    np.testing.assert_allclose(s[s.image == 1].ratio, e["negative"] / e["positive"], rtol=1e-6)


def test_recorded_energy_matches_probabilities_computed_outside(pipe):
    """The processor's side computation of softmax(QK^T/sqrt(d)) against the layer's own projections."""
    sampler = NegativeSampler(pipe, steps=2, three_branches=True)
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.processor"
    attn = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2
    seen = []
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0], kw["encoder_hidden_states"])),
                                            with_kwargs=True)
    rec = AttentionRecorder(pipe.unet, layers=[name], words=["cat"])
    try:
        sampler.generate(Batch(PROMPTS[:1], NEGS[:1], [3], [Always().plan(sampler.n_calls)]), [rec])
    finally:
        handle.remove()
    x, ctx = seen[0]  # step 0; rows negative, empty, positive
    q = attn.to_q(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    k = attn.to_k(ctx).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    size = sampler.latent_shape[1:]
    for j, branch in enumerate(("negative", "empty", "positive")):
        torch.testing.assert_close(rec.energy(0, branch)[0], slot_energy(probs[j], size), rtol=1e-4, atol=1e-8)
    cat = rec.maps(0, "positive", "cat")[0].float()
    torch.testing.assert_close(cat, heat_map(probs[2], [2], size), rtol=2e-3, atol=1e-4)


def test_two_branch_schedule_records_the_negative_only_where_computed(pipe):
    sampler = NegativeSampler(pipe, steps=6)
    n = sampler.n_calls
    meta = [{"positive_word": "cat"}]
    rec = AttentionRecorder(pipe.unet, keep_maps=True)
    sampler.generate(Batch(PROMPTS[:1], NEGS[:1], [0], [Window(2, 3).plan(n)], meta), [rec])  # installs itself
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())  # ... and removed itself
    table = rec.ratio_table()
    steps = lambda branch: sorted(set(table[table.branch == branch].step))  # noqa: E731
    assert steps("negative") == [2, 3]
    assert steps("empty") == [0, 1, 4, 5, 6]
    assert steps("positive") == list(range(n))
    dog = rec.maps(0, "negative", "dog")
    assert torch.isnan(dog[[0, 1, 4, 5, 6]]).all() and torch.isfinite(dog[[2, 3]]).all()
    assert list(rec.strength().step) == [2, 3]
    # the word_tokens variant of the positive branch reads the meta's positive word ("cat", slot 2)
    word = table[(table.branch == "positive") & (table.variant == "word_tokens")].value.to_numpy()
    np.testing.assert_allclose(word, rec.energy(0, "positive")[:, 2].numpy(), rtol=1e-6)


def test_install_refuses_processors_it_cannot_reproduce():
    pipe = tiny_pipeline(0)
    pipe.unet.set_default_attn_processor()  # AttnProcessor: different numerics from SDPA
    with pytest.raises(TypeError, match="AttnProcessor2_0"):
        AttentionRecorder(pipe.unet).install()


def test_a_positive_word_missing_from_the_prompt_is_an_error_and_installs_nothing(pipe):
    sampler = NegativeSampler(pipe, steps=2)
    before = dict(pipe.unet.attn_processors)
    rec = AttentionRecorder(pipe.unet, positive_word="zebra")
    with pytest.raises(ValueError, match="'zebra' is not in prompt"):
        sampler.generate(Batch(PROMPTS[:1], NEGS[:1], [0], [Always().plan(sampler.n_calls)]), [rec])
    assert all(pipe.unet.attn_processors[k] is before[k] for k in before)


# ----------------------------------------------------------------------------- the author's definitions (maps="daam")

# 1-D bicubic (Keys, A = -0.75, align_corners=False, border samples repeated) weights of the first of
# 2 samples at the 4 output positions (source coords -0.25, 0.25, 0.75, 1.25), computed by hand:
# e.g. at -0.25 the taps -2, -1, 0, 1 weigh w(1.75) + w(0.75) + w(0.25) = 1.10546875 on sample 0
BICUBIC_FIRST = torch.tensor([1.10546875, 0.7734375, 0.2265625, -0.10546875])


def test_daam_slot_energy_hand_example():
    # one head, a 2x2 layer, slot 0 = [[1, 0], [0, 0]]; latents 4x4
    probs = torch.zeros(1, 4, 2)
    probs[0, 0, 0] = 1.0
    probs[0, :, 1] = 0.5
    m = BICUBIC_FIRST
    up = torch.outer(m, m)  # bicubic overshoots to 1.22 and undershoots to -0.117: clamped at 0
    torch.testing.assert_close(daam_upsample(probs[None], (4, 4))[0, 0, 0], up.clamp(min=0))
    p, q = float((m[:3] ** 2).sum()), float(m[3] ** 2)
    daam = daam_slot_energy(probs, (4, 4))
    assert daam[0].item() == pytest.approx((p * p + q * q) / 16, rel=1e-6)  # clamped: cross terms m_3 m_i < 0 dropped
    assert daam[1].item() == pytest.approx(0.25)  # a constant map stays constant under bicubic too
    ours = slot_energy(probs, (4, 4))[0].item()  # bilinear: 1.625^2 / 16 = 0.1650
    assert ours == pytest.approx(1.625**2 / 16)
    assert daam[0].item() == pytest.approx(0.2189, abs=1e-4) and abs(daam[0].item() - ours) > 0.05
    assert (p + q) ** 2 / 16 != pytest.approx(daam[0].item())  # not clamping would give another number
    torch.testing.assert_close(daam_slot_energy(probs, (2, 2)), slot_energy(probs, (2, 2)))  # no resampling: equal


def test_daam_heat_map_weights_every_head_alike():
    # layer A: 1 head on the 4x4 latent grid, word slot 1 = 0.9 everywhere;
    # layer B: 3 heads on a 2x2 grid, slot 1 = 0.3, 0.3, 0.0 (constant maps: the kernel does not matter)
    a = torch.zeros(1, 16, 3)
    a[0, :, 1] = 0.9
    b = torch.zeros(3, 4, 3)
    b[0, :, 1], b[1, :, 1] = 0.3, 0.3
    ours = (heat_map(a, [1], (4, 4)) + heat_map(b, [1], (4, 4))) / 2  # heads, then layers: (0.9 + 0.2) / 2
    torch.testing.assert_close(ours, torch.full((4, 4), 0.55))
    daam = daam_heat_map([a, b], [1], (4, 4))  # every (layer, head) map alike: (0.9 + 0.3 + 0.3 + 0) / 4
    torch.testing.assert_close(daam, torch.full((4, 4), 0.375))
    # sub-word tokens: the mean of the clamped token maps
    b[:, :, 2] = 0.1
    torch.testing.assert_close(daam_heat_map([b], [1, 2], (4, 4)), torch.full((4, 4), (0.2 + 0.1) / 2))


def test_recorder_daam_matches_probabilities_and_keeps_negstudy_values(pipe):
    """maps='daam' on the 8x8 mid block (bicubic upsampling to 16x16): the recorder against the layer's
    own probabilities, and negstudy's values bit-identical to a recorder without it."""
    sampler = NegativeSampler(pipe, steps=2, three_branches=True)
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.processor"
    attn = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2
    seen = []
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0], kw["encoder_hidden_states"])),
                                            with_kwargs=True)
    batch = Batch(PROMPTS[:1], NEGS[:1], [3], [Always().plan(sampler.n_calls)])
    rec = AttentionRecorder(pipe.unet, layers=[name], words=["cat"], maps="daam")
    plain = AttentionRecorder(pipe.unet, layers=[name], words=["cat"])
    try:
        sampler.generate(batch, [rec])
    finally:
        handle.remove()
    sampler.generate(batch, [plain])
    x, ctx = seen[0]
    q = attn.to_q(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    k = attn.to_k(ctx).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    size = sampler.latent_shape[1:]
    for j, branch in enumerate(("negative", "empty", "positive")):
        torch.testing.assert_close(rec.energy(0, branch, "daam")[0], daam_slot_energy(probs[j], size), rtol=1e-4, atol=1e-8)
        assert torch.equal(rec.energy(0, branch), plain.energy(0, branch))
    torch.testing.assert_close(rec.maps(0, "positive", "cat", kind="daam")[0].float(),
                               daam_heat_map([probs[2]], [2], size), rtol=2e-3, atol=1e-4)
    assert torch.equal(rec.maps(0, "positive", "cat"), plain.maps(0, "positive", "cat"))
    assert not torch.allclose(rec.maps(0, "positive", "cat", kind="daam").float(), rec.maps(0, "positive", "cat").float())
    table = rec.ratio_table()
    assert set(table.variant) == {"all_tokens", "word_tokens", "all_tokens_daam", "word_tokens_daam"}
    assert set(plain.ratio_table().variant) == {"all_tokens", "word_tokens"}
    pd_ours = table[table.variant.isin(["all_tokens", "word_tokens"])].reset_index(drop=True)
    assert pd_ours.equals(plain.ratio_table())
    s = rec.strength("all_tokens_daam")
    e = {b: rec.energy(0, b, "daam").mean(1).numpy() for b in ("negative", "positive")}
    np.testing.assert_allclose(s.ratio, e["negative"] / e["positive"], rtol=1e-6)
    assert rec.variants() == ("all_tokens", "word_tokens", "all_tokens_daam", "word_tokens_daam")
    with pytest.raises(ValueError, match="maps='daam'"):
        plain.strength("all_tokens_daam")
    with pytest.raises(ValueError, match="maps='daam'"):
        plain.maps(0, "positive", "cat", kind="daam")
    with pytest.raises(ValueError, match="maps='bicubic'"):
        AttentionRecorder(pipe.unet, maps="bicubic")


def test_attention_maps_daam_from_the_command_line(tmp_path):
    """`attention.maps=daam` in the critical-step study on the shipped model: the ratio table holds the
    author's variants beside negstudy's, and the report reads the paper's ratio (sweep.variant)."""
    import subprocess
    import sys

    import pandas as pd

    out = tmp_path / "crit"
    pairs = '[{prompt:"a ball on the grass",negative:sun,category:object}]'
    proc = subprocess.run(
        [sys.executable, "-m", "negstudy", "+sweep=critical_step", "hydra.mode=RUN", "dataset.shards=1", "steps=5",
         "sweep.screen_seeds=2", "sweep.max_seeds=1", "sweep.min_seeds=1", "sweep.stride=3", "logger=none",
         "save_images=false", "attention.maps=daam", "sweep.variant=all_tokens_daam", f"dataset.pairs={pairs}",
         f"hydra.run.dir={out}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio = pd.read_parquet(out / "ratio.parquet")
    assert set(ratio.variant) == {"all_tokens", "word_tokens", "all_tokens_daam", "word_tokens_daam"}
    wide = ratio.pivot_table(index=["seed", "step"], columns="variant", values="ratio")
    assert (wide > 0).all().all() and not np.allclose(wide.all_tokens, wide.all_tokens_daam)
    attention = pd.read_parquet(out / "attention.parquet")
    if len(attention):  # the object appeared without the negative: its region exists
        assert attention.mass_in_region_daam.between(0, 1).all()


def test_attention_maps_key_is_validated(tiny_model_dir):
    from hydra import compose, initialize_config_module

    from negstudy.checks import validate
    from negstudy.config import register_configs
    from negstudy.errors import ConfigError

    register_configs()
    with initialize_config_module(config_module="negstudy.conf", version_base="1.3"):
        base = [f"model.path={tiny_model_dir}", "evaluator=none"]
        validate(compose(config_name="config", overrides=base + ["attention.maps=daam", "sweep.variant=word_tokens_daam"]))
        with pytest.raises(ConfigError) as bad_maps:
            validate(compose(config_name="config", overrides=base + ["attention.maps=bicubic"]))
        with pytest.raises(ConfigError) as needs_daam:
            validate(compose(config_name="config", overrides=base + ["sweep.variant=all_tokens_daam"]))
    assert str(bad_maps.value) == "attention.maps='bicubic': allowed values are negstudy, daam"
    assert str(needs_daam.value) == ("sweep.variant='all_tokens_daam': the author's ratio is recorded only with "
                                     "attention.maps=daam (attention.maps='negstudy')")
