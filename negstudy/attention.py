"""Cross-attention of the denoising loop: DAAM-style word maps and the strength ratio (PAPER.md section 3).

What is recorded, per image, branch ("negative", "empty", "positive") and step (UNet-call index,
see :mod:`negstudy.schedules`), reduced on the fly so that no full attention tensor is kept:

- ``energy``: (77,) float32, for every token slot k the paper's strength statistic restricted to
  that slot, summed over the recorded layers l and heads h::

      energy[k] = sum_{l,h} mean_{positions p} up(A_{l,h})[p, k] ** 2

  where A (positions x 77 slots) are the softmax probabilities and ``up`` is bilinear upsampling of
  each slot's map to the latent grid (h, w). The paper's statistic is ``energy.mean()`` (all 77
  slots, padding included: variant ``all_tokens``); ``energy[slots].mean()`` over the negative
  prompt's word tokens (negative branch) or a positive word's tokens (positive branch) is the
  ``word_tokens`` variant.
- word maps: (words, h, w) float16, each word's map averaged over heads, its sub-word tokens and
  the recorded layers, upsampled bilinearly to the latent grid and clamped at 0. A branch keeps
  the maps of the requested words that occur in that branch's prompt (the positive prompt's words
  in the positive branch, the negative prompt's in the negative branch, none in the empty one).

A branch that the schedule did not compute at a step has no entry for that step.

The author's definitions (``maps="daam"``, config ``attention.maps=daam``)
-------------------------------------------------------------------------
negstudy's maps average the heads of a layer first, then the layers, with bilinear upsampling.
The author's code (GitHub banyuanhao/daam, ``daam/trace.py``) keeps one map per (layer, head,
step): ``UNetCrossAttentionHooker.__call__`` stores every head's (77, h_l, w_l) probabilities in a
``RawHeatMapCollection`` (``daam/heatmap.py``, keyed by (factor, layer, head, step)), and both
``DiffusionHeatMapHooker.compute_global_heat_map`` (word maps) and ``compute_activation_ratio``
(the Figure 3 statistic) upsample EACH head's map with ``F.interpolate(..., mode='bicubic')``
(align_corners=False) and clamp it at 0 before anything else. With ``maps="daam"`` the recorder
computes, beside negstudy's quantities and from the same probabilities:

- ``energy_daam``: (77,) per slot, ``sum_{l,h} mean_p clamp(bic(A_{l,h}))[p, k] ** 2`` (bicubic
  undershoots, so clamping changes the value where bilinear would not); the ratio table gains the
  variants ``all_tokens_daam`` (the mean over the 77 slots: ``compute_activation_ratio``, the
  paper's Figure 3) and ``word_tokens_daam`` (the word slots of ``word_tokens``; the author's
  ``compute_activation_ratio_spec`` uses the whole prompt's tokens in the positive branch);
- word maps ``kind="daam"``: ``mean_{(l, h)} clamp(bic(A_{l,h}))`` over every (layer, head) map of
  the step with equal weight (``compute_global_heat_map`` stacks all maps and takes ``.mean(0)``),
  so a layer with more heads weighs more (SD2-base: 5, 10 or 20 heads per layer); a word's map is
  the mean of its sub-word tokens' maps (``GlobalHeatMap.compute_word_heat_map``). DAAM averages
  a window of steps with equal weight too, so the mean of these per-step maps over a window is
  DAAM's window map. Units: attention probability, as negstudy's.

On a UNet whose recorded layers all have the same number of heads (the tiny and shapes models)
the two map definitions differ only in the upsampling kernel; at a layer on the latent grid
itself they coincide.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from negstudy.sampler import Hook

VARIANTS = ("all_tokens", "word_tokens")
# The paper's Figure 3 statistic (its author's code averages all 77 slots): the numbers it reports
# (noun peak ~1.07 near step 5, adjectives crossing 1 near step 10) and the level 1 of the
# crossing rule are calibrated on it; word_tokens has no such reference yet.
DEFAULT_VARIANT = "all_tokens"
# The author's code's definitions (bicubic per head, clamped, every (layer, head) map weighted
# equally), recorded when the recorder is built with maps="daam".
DAAM_VARIANTS = ("all_tokens_daam", "word_tokens_daam")
MAPS = ("negstudy", "daam")  # config attention.maps: daam adds the author's definitions beside negstudy's
_DAAM_CHUNK = 1 << 24  # elements of upsampled maps held at once by the daam reduction

# CLIP's pre-tokenisation pattern (tokenization_clip.py) without the `regex` module: BPE never
# merges across these chunks, so a prompt's tokens are the concatenation of its chunks' tokens.
_CHUNK = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")


# ----------------------------------------------------------------------------- token slots


def _chunks(text: str) -> list[str]:
    return _CHUNK.findall(" ".join(text.lower().split()))


def word_token_slots(tokenizer, prompt: str, word: str) -> list[int]:
    """Token slots (0 = BOS, word tokens from 1) of ``word`` in ``prompt``, as the text encoder sees them.

    ``word`` may be several words ("Eiffel Tower"): the result is the union of their slots, over
    every occurrence, sorted. Matching is case-insensitive and on whole words (punctuation is a
    chunk of its own), so "tower" does not match "watchtower". Slots beyond the tokenizer's
    truncation (``model_max_length - 1`` holds EOS) are dropped. A word absent from the prompt
    gives ``[]``.
    """
    chunks = _chunks(prompt)
    pieces = [tokenizer(c, add_special_tokens=False).input_ids for c in chunks]
    whole = tokenizer(prompt, add_special_tokens=False).input_ids
    if [i for p in pieces for i in p] != whole:
        raise ValueError(f"cannot align the tokens of {prompt!r} with its words (tokenizer {type(tokenizer).__name__})")
    targets = set(_chunks(word))
    last = tokenizer.model_max_length - 2  # the last word slot; the slot after it holds EOS
    slots, pos = [], 1
    for chunk, ids in zip(chunks, pieces):
        if chunk in targets:
            slots.extend(s for s in range(pos, pos + len(ids)) if s <= last)
        pos += len(ids)
    return slots


def pipeline_tokenizers(pipe) -> list:
    """The tokenizers whose token slots the UNet attends to: SD's one, SDXL's two (``tokenizer``, ``tokenizer_2``).

    SDXL concatenates both text encoders' hidden states slot by slot, so slot k is one token only if
    both tokenizers put it there (:func:`word_slots` checks it).
    """
    return [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]


def word_slots(tokenizers: Sequence, prompt: str, word: str) -> list[int]:
    """:func:`word_token_slots` under every tokenizer of a pipeline; ValueError where they disagree.

    SDXL's two CLIP tokenizers share one BPE vocabulary (they differ in the padding token only), so
    a word's slots agree; a pipeline whose tokenizers split words differently has no per-word map.
    """
    slots = [word_token_slots(t, prompt, word) for t in tokenizers]
    if any(s != slots[0] for s in slots[1:]):
        raise ValueError(f"the tokenizers put {word!r} of {prompt!r} at different token slots {slots}: "
                         "a word's attention map needs one slot per token in every text encoder")
    return slots[0]


def prompt_words(prompt: str) -> list[str]:
    """The words of a prompt in order, lowercased, without repeats or punctuation."""
    return list(dict.fromkeys(c for c in _chunks(prompt) if any(ch.isalnum() for ch in c)))


# ----------------------------------------------------------------------------- reductions


@lru_cache(maxsize=256)
def latent_grid(n_positions: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (h_l, w_l) grid of a layer with ``n_positions`` positions in a UNet whose latents are ``size``.

    Each UNet level halves the grid with a stride-2 conv (padding 1), i.e. rounds up.
    """
    h, w = size
    while h * w > n_positions:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != n_positions:
        raise ValueError(f"{n_positions} positions are not a downsampled grid of the latent size {tuple(size)}")
    return h, w


@lru_cache(maxsize=64)
def _interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 matrix M with M @ x == F.interpolate(x, n_out, 'linear', align_corners=False)."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(0)  # (1, channels=n_in, length=n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


@lru_cache(maxsize=64)
def _gram(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    m = _interp_matrix(n_in, n_out)
    return (m.T @ m).to(device=device, dtype=torch.float32)


def slot_energy(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-slot strength statistic of one layer: ``sum_h mean_p up(A_h)[p, k] ** 2``.

    probs: (..., heads, N, K) attention probabilities, N = h_l * w_l positions of the layer's grid.
    size: the latent grid (h, w) the maps are upsampled to (bilinear, align_corners=False).
    Returns (..., K) float32.

    Bilinear upsampling is linear and separable, up(A) = M_y A M_x^T, so its mean square is
    ``sum(A * (G_y A G_x)) / (h w)`` with the small Gram matrices G = M^T M: exact, two small
    matrix products, and the (heads x K x h x w) upsampled tensor is never made.
    """
    return _slot_energy_sum(probs.float(), size) / (size[0] * size[1])


def _slot_energy_sum(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """slot_energy times h * w, for float32 ``a`` (the recorder divides once per step, not per layer)."""
    *lead, n, k = a.shape
    hl, wl = latent_grid(n, tuple(size))
    if (hl, wl) == tuple(size):
        t = a
    else:
        gy, gx = _gram(hl, size[0], a.device), _gram(wl, size[1], a.device)
        t = (gy @ a.reshape(*lead, hl, wl * k)).reshape(*lead, hl, wl, k)  # G_y A
        t = (gx @ t).reshape(*lead, n, k)  # (G_y A) G_x: matmul over the wl axis, batched over hl
    return (a * t).sum((-3, -2))


def slot_mixture(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention to token-slot mixtures on the layer's own grid.

    probs: (B, heads, N, K); weights: (B, K, W), column w holds 1/|slots| on word w's slots.
    Returns (B, N, W) float32.
    """
    return probs.mean(1, dtype=torch.float32) @ weights.float()


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, N, W) maps on a layer grid -> (B, W, h, w), bilinear (align_corners=False), not clamped.

    Linear, so layers of one grid may be summed before upsampling (the recorder does).
    """
    b, n, _ = maps.shape
    hl, wl = latent_grid(n, tuple(size))
    maps = maps.transpose(1, 2).reshape(b, -1, hl, wl)
    if (hl, wl) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps


def slot_weights(slot_lists: Sequence[Sequence[int]], n_slots: int = 77) -> torch.Tensor:
    """(K, W) matrix averaging over each word's slots; a word with no slots gets a zero column."""
    w = torch.zeros(n_slots, len(slot_lists))
    for j, slots in enumerate(slot_lists):
        if slots:
            w[list(slots), j] = 1.0 / len(slots)
    return w


def heat_map(probs: torch.Tensor, token_slots: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
    """DAAM map of one word in one layer: mean over heads and ``token_slots``, bilinear to ``size``, clamped at 0.

    probs: (heads, N, K) attention probabilities of one image; returns (h, w) float32.
    """
    w = slot_weights([token_slots], probs.shape[-1]).unsqueeze(0)
    return upsample_maps(slot_mixture(probs.unsqueeze(0), w), size)[0, 0].clamp(min=0)


def daam_upsample(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Every head's per-slot map upsampled bicubically and clamped at 0, as the author's ``daam/trace.py``.

    probs: (..., heads, N, K) on a layer grid; returns (..., heads, K, h, w) float32
    (``F.interpolate(mode='bicubic', align_corners=False).clamp(min=0)``; a layer on the latent
    grid itself is not resampled: bicubic at scale 1 is the identity).
    """
    *lead, heads, n, k = probs.shape
    hl, wl = latent_grid(n, tuple(size))
    x = probs.float().transpose(-1, -2).reshape(-1, k, hl, wl)
    if (hl, wl) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False)
    return x.clamp(min=0).reshape(*lead, heads, k, *size)


def daam_slot_energy(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The author's per-slot strength statistic of one layer: ``sum_h mean_p clamp(bic(A_h))[p, k] ** 2``.

    probs: (..., heads, N, K); returns (..., K) float32. Source: ``compute_activation_ratio`` in
    banyuanhao/daam ``daam/trace.py`` (``heat_map.pow(2).mean()`` per (layer, head), summed per step).
    """
    return daam_upsample(probs, size).square().mean((-2, -1)).sum(-2)


def daam_heat_map(layers: Sequence[torch.Tensor], token_slots: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
    """DAAM's word map of one step: the mean over EVERY (layer, head) map, then over ``token_slots``.

    layers: per layer the (heads, N, K) probabilities of one image (grids and head counts may
    differ). Each head's map is upsampled bicubically and clamped before averaging, so a layer
    with more heads weighs more (``compute_global_heat_map`` in banyuanhao/daam ``daam/trace.py``).
    Returns (h, w) float32.
    """
    maps = torch.cat([daam_upsample(p, size) for p in layers])  # (all heads, K, h, w)
    return maps.mean(0)[list(token_slots)].mean(0)


def _daam_reduce(probs: torch.Tensor, size: tuple[int, int], weights: torch.Tensor | None):
    """One layer (B, heads, N, K) -> (energy (B, K), head-summed word maps (B, W, h, w) or None), in row chunks."""
    b, heads, n, k = probs.shape
    per_row = heads * k * size[0] * size[1]
    rows = max(1, _DAAM_CHUNK // per_row)
    energies, maps = [], []
    for s in range(0, b, rows):
        up = daam_upsample(probs[s : s + rows], size)  # (c, heads, K, h, w)
        energies.append(up.square().mean((-2, -1)).sum(1))
        if weights is not None:
            summed = up.sum(1).flatten(-2)  # (c, K, h*w)
            maps.append((weights[s : s + rows].transpose(1, 2).float() @ summed).unflatten(-1, tuple(size)))
    return torch.cat(energies), (torch.cat(maps) if maps else None)


def strength_ratio(neg_values, pos_values) -> np.ndarray:
    """Ratio(t) = statistic of the negative branch / statistic of the positive branch, per step.

    Both (steps,) (or broadcastable, e.g. (seeds, steps)); NaN where a branch is missing.
    """
    neg, pos = np.asarray(neg_values, dtype=float), np.asarray(pos_values, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return neg / pos


def mask_on_grid(mask, size: tuple[int, int]) -> np.ndarray:
    """A bool (H, W) image-space region on the grid ``size`` (the latents, where the maps live): a cell
    is in the region if at least half of the pixels it covers are (area pooling); the identity for
    pixel-space models, whose maps are at the image's size."""
    m = torch.as_tensor(np.asarray(mask)).bool()
    if tuple(m.shape) != tuple(size):
        m = F.interpolate(m[None, None].float(), size=tuple(size), mode="area")[0, 0] >= 0.5
    return m.numpy()


def mass_in_mask(map, mask) -> float:
    """Fraction of a map's (non-negative) mass inside a boolean mask of the same (h, w); NaN for an all-zero map."""
    m, k = _pair(map, mask)
    total = m.sum()
    return float(m[k].sum() / total) if total > 0 else float("nan")


def iou(map, mask, threshold: float = 0.5) -> float:
    """IoU between a mask and the map binarised at ``threshold * map.max()``.

    The relative threshold makes the score independent of the map's scale, which varies with the
    layer count, the step and the word; 0.5 keeps the map's "half-maximum" region, the usual
    choice for attribution maps. NaN when both regions are empty.
    """
    m, k = _pair(map, mask)
    peak = m.max()
    region = m >= threshold * peak if peak > 0 else torch.zeros_like(k)
    union = (region | k).sum()
    return float((region & k).sum() / union) if union > 0 else float("nan")


def _pair(map, mask) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(map).double().clamp(min=0)
    k = torch.as_tensor(mask).bool()
    if m.shape != k.shape:
        raise ValueError(f"map {tuple(m.shape)} and mask {tuple(k.shape)} differ; resize the mask to the map first")
    return m, k


# ----------------------------------------------------------------------------- the recorder


class _RecordingProcessor:
    """diffusers' AttnProcessor2_0, line for line, plus a side computation of the probabilities.

    The output is computed by the very same operations as AttnProcessor2_0 (so images are
    bit-identical with and without recording); softmax(QK^T / sqrt(d)) is computed separately,
    in float32, only to be reduced by the recorder.
    """

    def __init__(self, recorder: "AttentionRecorder"):
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.recorder.active:
            # float32, with SDPA's default scale 1/sqrt(d), which AttnProcessor2_0 uses (not attn.scale)
            logits = query.float() @ (key.float().transpose(-1, -2) * head_dim**-0.5)
            if attention_mask is not None:
                logits = logits + attention_mask.float()
            self.recorder._reduce(logits.softmax(-1))

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def select_layers(names: Sequence[str], layers: str | Sequence[str] = "down_up") -> list[str]:
    """The cross-attention (``attn2``) processor names to record.

    layers: "down_up" (the paper: down and up blocks, mid block excluded), "all", or a list of
    name substrings (a layer is kept if any substring occurs in its name).
    """
    cross = [n for n in names if "attn2" in n]
    if layers == "all":
        chosen = cross
    elif layers == "down_up":
        chosen = [n for n in cross if n.startswith(("down_blocks", "up_blocks"))]
    elif isinstance(layers, str):
        raise ValueError(f"layers={layers!r}: expected 'down_up', 'all' or a list of name substrings")
    else:
        chosen = [n for n in cross if any(s in n for s in layers)]
    if not chosen:
        raise ValueError(f"layers={layers!r} selects no cross-attention layer")
    return chosen


class AttentionRecorder(Hook):
    """Records cross-attention reductions of every UNet call of :class:`negstudy.sampler.NegativeSampler`.

    unet: the sampler's UNet. layers: see :func:`select_layers`. words: the words whose maps are
    kept (each looked up in each branch's prompt; a multi-word entry is the union of its words'
    tokens); None means every word of the positive and the negative prompt, plus the negative
    prompt as one phrase when it has several words ("eiffel tower"). keep_maps: False
    records only the strength statistic. positive_word: the positive word of the ``word_tokens``
    variant, for every image; ``batch.meta[i]["positive_word"]`` overrides it per image; with
    neither, all word tokens of the prompt are used.

    Install with :meth:`install` / :meth:`remove` or ``with recorder:``; if it is not installed when
    the loop starts, it installs itself for that call and removes itself at the end. While the loop
    runs, results stay on the UNet's device; ``on_end`` moves them to the host, after which the
    tables, maps and :meth:`nbytes` describe the last ``generate`` call (``on_start`` clears them).
    Image indices are the batch's.
    """

    def __init__(self, unet, layers: str | Sequence[str] = "down_up", words: Sequence[str] | None = None,
                 keep_maps: bool = True, positive_word: str | None = None, maps: str = "negstudy"):
        if maps not in MAPS:
            raise ValueError(f"maps={maps!r}: expected one of {MAPS}")
        self.maps_kind = maps
        self.unet = unet
        self.layers = select_layers(list(unet.attn_processors), layers)
        self.words = list(words) if words is not None else None
        self.keep_maps = keep_maps
        self.positive_word = positive_word
        self._original: dict | None = None
        self._auto_installed = False
        self.active = False
        self._clear()

    # -- installation

    def install(self) -> "AttentionRecorder":
        if self._original is not None:
            return self
        original = dict(self.unet.attn_processors)
        for name in self.layers:
            if type(original[name]) is not AttnProcessor2_0:
                raise TypeError(f"{name} uses {type(original[name]).__name__}; the recorder reproduces only "
                                "AttnProcessor2_0, so images would change")
        self._original = original
        procs = dict(original)
        for name in self.layers:
            procs[name] = _RecordingProcessor(self)
        self.unet.set_attn_processor(procs)
        return self

    def remove(self) -> None:
        if self._original is not None:
            self.unet.set_attn_processor(self._original)
            self._original = None
        self.active = False

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()

    # -- hook interface

    def on_start(self, sampler, batch) -> None:
        if sampler.unet is not self.unet:
            raise ValueError("the recorder was built on another UNet than the sampler's")
        self._clear()
        self.size = tuple(sampler.latent_shape[1:])
        self.n_steps = sampler.n_calls
        self.n_slots = sampler.encode("").shape[1]  # token slots the UNet attends to (77)
        tok = pipeline_tokenizers(sampler.pipe)
        for i in range(len(batch)):
            prompt, negative = batch.prompts[i], batch.negative_prompts[i]
            meta = batch.meta[i] if i < len(batch.meta) else {}
            pos_word = meta.get("positive_word", self.positive_word)
            pos_slots = word_slots(tok, prompt, pos_word or " ".join(prompt_words(prompt)))
            if pos_word and not pos_slots:
                raise ValueError(f"positive word {pos_word!r} is not in prompt {prompt!r} (image {i})")
            self._ratio_slots[(i, "positive")] = pos_slots
            self._ratio_slots[(i, "negative")] = word_slots(tok, negative, " ".join(prompt_words(negative)))
            self._ratio_slots[(i, "empty")] = []
            wanted = self.words
            if wanted is None:  # every word, and the negative prompt as one phrase if it has several
                neg = prompt_words(negative)
                wanted = prompt_words(prompt) + neg + ([" ".join(neg)] if len(neg) > 1 else [])
            for branch, text in (("negative", negative), ("empty", ""), ("positive", prompt)):
                found = {w: word_slots(tok, text, w) for w in dict.fromkeys(wanted)} if self.keep_maps else {}
                self._words[(i, branch)] = {w: s for w, s in found.items() if s}
        self._auto_installed = self._original is None
        self.install()

    def before_unet(self, step: int, rows: list[tuple[int, str]]) -> None:
        self._step, self._rows = step, rows
        self._n_layers = 0
        self._energy_acc = None
        self._maps_acc = {}  # positions N of a layer grid -> (B, N, W) sum over that grid's layers
        self._weights = self._row_weights(tuple(rows)) if self.keep_maps else None
        self._daam_energy_acc, self._daam_maps_acc, self._n_heads = None, None, 0
        self.active = True

    def _row_weights(self, rows: tuple[tuple[int, str], ...]) -> torch.Tensor | None:
        """(B, K, W) slot weights of the kept words of each batch row (zero-padded), cached per row layout."""
        if rows not in self._weight_cache:
            slot_lists = [list(self._words[r].values()) for r in rows]
            width = max((len(s) for s in slot_lists), default=0)
            w = torch.zeros(len(rows), self.n_slots, width)
            for j, slots in enumerate(slot_lists):
                if slots:
                    w[j, :, : len(slots)] = slot_weights(slots, self.n_slots)
            self._weight_cache[rows] = w.to(self.unet.device) if width else None
        return self._weight_cache[rows]

    def _reduce(self, probs: torch.Tensor) -> None:
        """One layer's probabilities (B, heads, N, K) float32 of the current step -> running sums.

        Called from inside the UNet; kept to a handful of kernels (the UNet's own launch rate is
        the bottleneck of fp16 sampling on a GPU), upsampling of the maps is left to on_step.
        """
        if probs.shape[0] != len(self._rows):
            raise RuntimeError(f"UNet batch of {probs.shape[0]} rows, but the loop announced {len(self._rows)}")
        energy = _slot_energy_sum(probs, self.size)
        self._energy_acc = energy if self._energy_acc is None else self._energy_acc.add_(energy)
        if self._weights is not None:
            grid = probs.shape[2]
            maps = probs.mean(1) @ self._weights  # slot_mixture, without its casts
            self._maps_acc[grid] = self._maps_acc[grid].add_(maps) if grid in self._maps_acc else maps
        if self.maps_kind == "daam":
            e, m = _daam_reduce(probs, self.size, self._weights)
            self._daam_energy_acc = e if self._daam_energy_acc is None else self._daam_energy_acc.add_(e)
            if m is not None:
                self._daam_maps_acc = m if self._daam_maps_acc is None else self._daam_maps_acc.add_(m)
            self._n_heads += probs.shape[1]
        self._n_layers += 1

    def on_step(self, state) -> None:
        self.active = False
        if self._n_layers != len(self.layers):
            raise RuntimeError(f"step {self._step}: {self._n_layers} of {len(self.layers)} recorded layers ran")
        maps = None
        if self._maps_acc:
            up = sum(upsample_maps(m, self.size) for m in self._maps_acc.values())
            maps = (up / self._n_layers).clamp_(min=0).to(torch.float16)
        daam_maps = None
        if self._daam_maps_acc is not None:
            daam_maps = (self._daam_maps_acc / self._n_heads).to(torch.float16)
        # kept on the device until on_end: a copy to the host here would stall the loop every step
        self._pending.append((self._step, self._rows, self._energy_acc / (self.size[0] * self.size[1]), maps,
                              self._daam_energy_acc, daam_maps))

    def on_end(self, images) -> None:
        for step, rows, energy, maps, daam_energy, daam_maps in self._pending:
            energy = energy.cpu()
            maps = maps.cpu() if maps is not None else None
            daam_energy = daam_energy.cpu() if daam_energy is not None else None
            daam_maps = daam_maps.cpu() if daam_maps is not None else None
            for j, (image, branch) in enumerate(rows):
                self._energy[(image, branch, step)] = energy[j].clone()
                n_words = len(self._words[(image, branch)])
                if maps is not None and n_words:
                    self._maps[(image, branch, step)] = maps[j, :n_words].clone()
                if daam_energy is not None:
                    self._energy_daam[(image, branch, step)] = daam_energy[j].clone()
                if daam_maps is not None and n_words:
                    self._maps_daam[(image, branch, step)] = daam_maps[j, :n_words].clone()
        self._pending = []
        self.close()

    def close(self) -> None:
        if self._auto_installed:
            self.remove()
            self._auto_installed = False

    # -- results

    def _clear(self) -> None:
        self._energy: dict[tuple[int, str, int], torch.Tensor] = {}
        self._maps: dict[tuple[int, str, int], torch.Tensor] = {}
        self._energy_daam: dict[tuple[int, str, int], torch.Tensor] = {}
        self._maps_daam: dict[tuple[int, str, int], torch.Tensor] = {}
        self._words: dict[tuple[int, str], dict[str, list[int]]] = {}
        self._ratio_slots: dict[tuple[int, str], list[int]] = {}
        self._weight_cache: dict[tuple, torch.Tensor | None] = {}
        self._pending: list = []  # (step, rows, energy (B, K), maps (B, W, h, w) or None) on the device

    def nbytes(self) -> int:
        """Bytes of recorded data (maps and per-slot energies) held for the last batch."""
        dicts = (self._energy, self._maps, self._energy_daam, self._maps_daam)
        return sum(t.numel() * t.element_size() for d in dicts for t in d.values())

    def words_of(self, image: int, branch: str) -> list[str]:
        """The words whose maps are kept for this image and branch, in map order."""
        return list(self._words[(image, branch)])

    def energy(self, image: int, branch: str, kind: str = "negstudy") -> torch.Tensor:
        """(steps, 77) per-slot statistic, NaN at steps where the branch was not computed.

        kind: "negstudy", or "daam" (the author's definition, recorded with ``maps="daam"``).
        """
        out = torch.full((self.n_steps, self.n_slots), float("nan"))
        for (i, b, t), e in self._source(kind, self._energy, self._energy_daam).items():
            if i == image and b == branch:
                out[t] = e
        return out

    def ratio_table(self):
        """Tidy table of the strength statistic: columns image, step, branch, variant, value.

        ``all_tokens``: mean of the per-slot statistic over all 77 slots. ``word_tokens``: mean over
        the negative prompt's word tokens (negative branch) or the positive word's tokens (positive
        branch); absent for the empty branch, which has no words. With ``maps="daam"`` the same two
        on the author's per-slot statistic: ``all_tokens_daam``, ``word_tokens_daam``.
        """
        rows = []
        for suffix, source in (("", self._energy), ("_daam", self._energy_daam)):
            for (image, branch, step), e in sorted(source.items()):
                rows.append((image, step, branch, "all_tokens" + suffix, float(e.mean())))
                slots = self._ratio_slots[(image, branch)]
                if slots:
                    rows.append((image, step, branch, "word_tokens" + suffix, float(e[slots].mean())))
        return pd.DataFrame(rows, columns=["image", "step", "branch", "variant", "value"])

    def strength(self, variant: str = DEFAULT_VARIANT):
        """Tidy table image, step, ratio: Ratio(t) = negative / positive (PAPER.md Figure 3)."""
        if variant not in VARIANTS + DAAM_VARIANTS:
            raise ValueError(f"variant={variant!r}: expected one of {VARIANTS + DAAM_VARIANTS}")
        if variant in DAAM_VARIANTS and self.maps_kind != "daam":
            raise ValueError(f"variant={variant!r} needs a recorder built with maps='daam'")
        t = self.ratio_table()
        t = t[t.variant == variant].pivot_table(index=["image", "step"], columns="branch", values="value")
        t = t.reindex(columns=["negative", "positive"])
        t["ratio"] = strength_ratio(t["negative"], t["positive"])
        return t.reset_index().rename_axis(columns=None)[["image", "step", "ratio"]].dropna()

    def variants(self) -> tuple[str, ...]:
        """The ratio variants this recorder computes."""
        return VARIANTS + (DAAM_VARIANTS if self.maps_kind == "daam" else ())

    def _source(self, kind: str, ours: dict, daam: dict) -> dict:
        if kind not in MAPS:
            raise ValueError(f"kind={kind!r}: expected one of {MAPS}")
        if kind == "daam" and self.maps_kind != "daam":
            raise ValueError("kind='daam' needs a recorder built with maps='daam'")
        return daam if kind == "daam" else ours

    def maps(self, image: int, branch: str, word: str, kind: str = "negstudy") -> torch.Tensor:
        """(steps, h, w) float16 map of ``word``; NaN at steps where the branch was not computed.

        kind: "negstudy" (heads, then layers, bilinear) or "daam" (every (layer, head) map alike,
        bicubic, clamped per head; recorded with ``maps="daam"``).
        """
        source = self._source(kind, self._maps, self._maps_daam)
        words = self._words.get((image, branch), {})
        key = " ".join(_chunks(word))
        index = {" ".join(_chunks(w)): j for j, w in enumerate(words)}
        if key not in index:
            raise KeyError(f"no map of {word!r} for image {image}, branch {branch}; kept: {list(words)}")
        out = torch.full((self.n_steps, *self.size), float("nan"), dtype=torch.float16)
        for (i, b, t), m in source.items():
            if i == image and b == branch:
                out[t] = m[index[key]]
        return out
