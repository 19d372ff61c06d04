"""The shapes world in torch: scenes sampled, rendered and tokenised in batches, on any device.

`negstudy.shapes.world` is the reference (one Python scene at a time, numpy); this module draws
the same distribution as whole tensors so that a training loop can make thousands of fresh
images per step on its GPU. Three parts, each checked against the reference in
tests/test_render_torch.py:

* `sample_specs(n, generator)`: a `SceneSpecs` batch distributed like `world.sample_scene`
  (same background, count, class, size, placement, naming and attribute laws; placement is the
  same rejection sampler: uniform top-left corners, 64 tries per object, the layout restarted
  when one object finds no room). Not the same random stream: equal in distribution only.
* `render(specs)`: uint8 (N, 3, 32, 32) images. Pixel-exact against `world.render_batch` for
  the same scenes; noisy images too when `noise` is given the reference's draws, otherwise they
  differ only by the independent N(0, NOISE_STD) noise.
* `CaptionTokens(tokenizer).ids(specs)`: (N, 77) token ids equal to
  ``tokenizer([world.caption(s) ...], padding="max_length", max_length=77)`` for the same scenes.

`specs_from_scenes` / `scenes_from_specs` convert between the two representations.

Layout of a `SceneSpecs` batch (all tensors on one device, N rows, up to MAX_OBJECTS slots):
``cls`` (N, 3) object class index into `world.OBJECT_NAMES` (-1 = empty slot; filled slots come
first), ``x0``, ``y0``, ``size`` (N, 3) integer box (top-left corner and side, pixels),
``background`` (N,) index into `world.BACKGROUND_NAMES`, ``attribute`` (N,) index into
`world.ATTRIBUTES` (-1 = none), ``named`` (N, 3) class indices in caption order (-1 padded),
``attribute_named`` (N,) bool.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from negstudy.shapes import world

MAX_TOKENS = 77
PLACE_TRIES = 64  # world._place's default
_SIZES = np.arange(world.SIZE_RANGE[0], world.SIZE_RANGE[1] + 1)
_SHAPES = ("disc", "square", "triangle", "diamond")
_BLURRY, _NOISY, _DARK, _STRIPED = (world.ATTRIBUTES.index(a) for a in ("blurry", "noisy", "dark", "striped"))


@dataclass
class SceneSpecs:
    """A batch of scenes as tensors (see the module docstring for the layout)."""

    background: torch.Tensor
    cls: torch.Tensor
    x0: torch.Tensor
    y0: torch.Tensor
    size: torch.Tensor
    attribute: torch.Tensor
    named: torch.Tensor
    attribute_named: torch.Tensor

    def __len__(self) -> int:
        return len(self.background)

    def to(self, device) -> "SceneSpecs":
        return SceneSpecs(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


# ----------------------------------------------------------------------------- sampling


def _categorical(probs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) int64 draws from the distribution `probs` (K,) by inverse CDF."""
    u = torch.rand(n, generator=generator, device=probs.device, dtype=torch.float64)
    cdf = torch.cumsum(probs.double(), 0)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(probs) - 1)


def _place(size: torch.Tensor, count: torch.Tensor, generator: torch.Generator):
    """world._place for every row: (x0, y0) (N, 3) int64 for boxes of side `size` (N, 3).

    Slot j is placed only where j < count. Per slot, PLACE_TRIES candidate corners are drawn
    uniformly over the valid range and the first one clear of the earlier boxes (MIN_GAP) wins;
    rows where some slot finds none are redrawn from scratch (same sizes), as in the reference.
    One host sync per restart round.
    """
    n, device = len(size), size.device
    x0 = torch.zeros_like(size)
    y0 = torch.zeros_like(size)
    todo = torch.arange(n, device=device)
    while len(todo):
        s, k = size[todo], count[todo]
        span = (world.RESOLUTION - s + 1).unsqueeze(-1)  # (m, 3, 1): valid corners in [0, span)
        cand = torch.rand((len(todo), world.MAX_OBJECTS, PLACE_TRIES, 2), generator=generator, device=device)
        cx = torch.minimum((cand[..., 0] * span).long(), span - 1)  # (m, 3, T)
        cy = torch.minimum((cand[..., 1] * span).long(), span - 1)
        bx = torch.zeros_like(s)
        by = torch.zeros_like(s)
        ok = torch.ones(len(todo), dtype=torch.bool, device=device)
        for j in range(world.MAX_OBJECTS):
            clear = torch.ones_like(cx[:, j])
            for i in range(j):
                clear &= (
                    (cx[:, j] + s[:, j, None] + world.MIN_GAP <= bx[:, i, None])
                    | (bx[:, i, None] + s[:, i, None] + world.MIN_GAP <= cx[:, j])
                    | (cy[:, j] + s[:, j, None] + world.MIN_GAP <= by[:, i, None])
                    | (by[:, i, None] + s[:, i, None] + world.MIN_GAP <= cy[:, j])
                )
            first = clear.long().argmax(1)  # index of the first clear candidate (0 if none)
            bx[:, j] = cx[:, j].gather(1, first[:, None])[:, 0]
            by[:, j] = cy[:, j].gather(1, first[:, None])[:, 0]
            ok &= clear.any(1) | (j >= k)
        x0[todo], y0[todo] = bx, by
        todo = todo[~ok]
    slot = torch.arange(world.MAX_OBJECTS, device=device)
    empty = slot >= count[:, None]
    return x0.masked_fill(empty, 0), y0.masked_fill(empty, 0)


def sample_specs(
    n: int,
    generator: torch.Generator,
    *,
    p_counts=(0.1, 0.35, 0.35, 0.2),
    p_attribute: float = 0.3,
    p_named: float = 0.6,
    p_named_attribute: float = 0.6,
) -> SceneSpecs:
    """n scenes distributed like `world.sample_scene(rng, **same kwargs)`, on generator's device."""
    p_counts = np.asarray(p_counts, dtype=float)
    if p_counts.ndim != 1 or len(p_counts) > world.MAX_OBJECTS + 1 or abs(p_counts.sum() - 1) > 1e-6:
        raise ValueError(f"p_counts must be <= {world.MAX_OBJECTS + 1} probabilities summing to 1")
    device = generator.device
    g = generator
    slot = torch.arange(world.MAX_OBJECTS, device=device)
    background = torch.randint(len(world.BACKGROUND_NAMES), (n,), generator=g, device=device)
    count = _categorical(torch.as_tensor(p_counts, device=device), n, g)
    present = slot < count[:, None]
    # classes without replacement: the first k of a uniform random permutation
    perm = torch.rand((n, len(world.OBJECT_NAMES)), generator=g, device=device).argsort(1)
    cls = perm[:, : world.MAX_OBJECTS].masked_fill(~present, -1)
    size = torch.randint(world.SIZE_RANGE[0], world.SIZE_RANGE[1] + 1, (n, world.MAX_OBJECTS), generator=g, device=device)
    size = size.masked_fill(~present, 0)
    x0, y0 = _place(size, count, g)
    # naming: each present object independently, then a uniform random caption order
    is_named = present & (torch.rand((n, world.MAX_OBJECTS), generator=g, device=device) < p_named)
    key = torch.rand((n, world.MAX_OBJECTS), generator=g, device=device).masked_fill(~is_named, 2.0)
    order = key.argsort(1)
    named = cls.gather(1, order).masked_fill(~is_named.gather(1, order), -1)
    # attribute: uniform over ATTRIBUTES, never blurry without objects
    has_attr = torch.rand(n, generator=g, device=device) < p_attribute
    u = torch.rand(n, generator=g, device=device)
    n_allowed = torch.where(count > 0, len(world.ATTRIBUTES), len(world.ATTRIBUTES) - 1)
    pick = (u * n_allowed).long().clamp_(max=len(world.ATTRIBUTES) - 1)
    others = torch.tensor([i for i, a in enumerate(world.ATTRIBUTES) if a != "blurry"], device=device)
    attribute = torch.where(count > 0, pick, others[pick.clamp(max=len(others) - 1)])
    attribute = attribute.masked_fill(~has_attr, -1)
    attribute_named = has_attr & (torch.rand(n, generator=g, device=device) < p_named_attribute)
    return SceneSpecs(background, cls, x0, y0, size, attribute, named, attribute_named)


# ----------------------------------------------------------------------------- conversion


def specs_from_scenes(scenes: list[world.Scene], device="cpu") -> SceneSpecs:
    """The reference scenes as a SceneSpecs batch (exact: same boxes, names, order)."""
    n, m = len(scenes), world.MAX_OBJECTS
    a = {k: np.full((n, m), -1 if k in ("cls", "named") else 0, np.int64) for k in ("cls", "x0", "y0", "size", "named")}
    background = np.array([world.BACKGROUND_NAMES.index(s.background) for s in scenes], np.int64)
    attribute = np.array([world.ATTRIBUTES.index(s.attribute) if s.attribute else -1 for s in scenes], np.int64)
    attribute_named = np.array([s.attribute is not None and s.attribute_named for s in scenes], bool)
    for i, s in enumerate(scenes):
        for j, o in enumerate(s.objects):
            a["cls"][i, j] = world.OBJECT_NAMES.index(o.name)
            a["x0"][i, j], a["y0"][i, j], a["size"][i, j] = o.x0, o.y0, o.size
        for j, name in enumerate(s.named_objects):
            a["named"][i, j] = world.OBJECT_NAMES.index(name)
    t = {k: torch.from_numpy(v).to(device) for k, v in a.items()}
    return SceneSpecs(torch.from_numpy(background).to(device), t["cls"], t["x0"], t["y0"], t["size"],
                      torch.from_numpy(attribute).to(device), t["named"], torch.from_numpy(attribute_named).to(device))


def scenes_from_specs(specs: SceneSpecs) -> list[world.Scene]:
    """The batch as reference `world.Scene`s (for captions, the oracle, or world.render_batch)."""
    c = {f.name: getattr(specs, f.name).cpu().numpy() for f in fields(specs)}
    out = []
    for i in range(len(specs)):
        objects = tuple(
            world.PlacedObject(world.OBJECT_NAMES[k], x + s / 2.0, y + s / 2.0, int(s))
            for k, x, y, s in zip(c["cls"][i], c["x0"][i], c["y0"][i], c["size"][i]) if k >= 0
        )
        attr = world.ATTRIBUTES[c["attribute"][i]] if c["attribute"][i] >= 0 else None
        named = tuple(world.OBJECT_NAMES[k] for k in c["named"][i] if k >= 0)
        out.append(world.Scene(world.BACKGROUND_NAMES[c["background"][i]], objects, attr, named,
                               bool(c["attribute_named"][i])))
    return out


# ----------------------------------------------------------------------------- rendering


def _sprite_bank(device) -> torch.Tensor:
    """Bool (4 shapes * 5 sizes, S, S) of world.sprite masks, top-left aligned, S = max size."""
    big = world.SIZE_RANGE[1]
    bank = np.zeros((len(_SHAPES) * len(_SIZES), big, big), bool)
    for i, shape in enumerate(_SHAPES):
        for j, s in enumerate(_SIZES):
            bank[i * len(_SIZES) + j, :s, :s] = world.sprite(shape, int(s))
    return torch.from_numpy(bank).to(device)


_BANKS: dict[str, torch.Tensor] = {}


def _blur(x: torch.Tensor) -> torch.Tensor:
    """world.blur on float32 (N, C, H, W): same kernel, passes, edge padding and summation order."""
    r = len(world.BLUR_KERNEL) // 2
    weights = [float(np.float32(w)) for w in world.BLUR_KERNEL]
    for _ in range(world.BLUR_PASSES):
        for dim in (2, 3):  # rows (H) then columns (W), as the reference's axes
            n = x.shape[dim]
            p = torch.cat([x.narrow(dim, 0, 1).expand_as(x.narrow(dim, 0, r)), x,
                           x.narrow(dim, n - 1, 1).expand_as(x.narrow(dim, 0, r))], dim)
            acc = torch.zeros_like(x)
            for i, w in enumerate(weights):
                acc += w * p.narrow(dim, i, n)
            x = acc
    return x


def render(specs: SceneSpecs, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) images of the scenes, on the specs' device.

    Background, sprites (world.sprite masks and world colours) and the attribute, computed in
    float32 in the reference's order, rounded half-to-even and clipped once. Noisy images take
    N(0, NOISE_STD) from `generator`, or the (N, 3, 32, 32) float `noise` if given (only its
    noisy rows are used).
    """
    device = specs.background.device
    n, res = len(specs), world.RESOLUTION
    bank = _BANKS.get(str(device))
    if bank is None:
        bank = _BANKS[str(device)] = _sprite_bank(device)
    big = bank.shape[-1]
    bg_rgb = torch.tensor([world.BACKGROUNDS[b] for b in world.BACKGROUND_NAMES], dtype=torch.float32, device=device)
    obj_rgb = torch.tensor([world.OBJECTS[o].rgb for o in world.OBJECT_NAMES], dtype=torch.float32, device=device)
    obj_shape = torch.tensor([_SHAPES.index(world.OBJECTS[o].shape) for o in world.OBJECT_NAMES], device=device)

    img = bg_rgb[specs.background][:, :, None, None].expand(n, 3, res, res).contiguous()
    pix = torch.arange(res, device=device)
    for j in range(world.MAX_OBJECTS):
        k = specs.cls[:, j]
        dy = pix[None, :] - specs.y0[:, j, None]  # (N, H)
        dx = pix[None, :] - specs.x0[:, j, None]  # (N, W)
        s = specs.size[:, j, None]
        iny, inx = (dy >= 0) & (dy < s), (dx >= 0) & (dx < s)
        sprite_id = obj_shape[k.clamp(min=0)] * len(_SIZES) + (specs.size[:, j] - int(_SIZES[0])).clamp(0, len(_SIZES) - 1)
        flat = (sprite_id[:, None, None] * big + dy.clamp(0, big - 1)[:, :, None]) * big + dx.clamp(0, big - 1)[:, None, :]
        mask = bank.view(-1)[flat] & iny[:, :, None] & inx[:, None, :] & (k >= 0)[:, None, None]  # (N, H, W)
        img = torch.where(mask[:, None], obj_rgb[k.clamp(min=0)][:, :, None, None], img)

    attr = specs.attribute
    blurry = torch.nonzero(attr == _BLURRY)[:, 0]  # one host sync per attribute: the subsets are small
    if len(blurry):
        img[blurry] = _blur(img[blurry])
    noisy = torch.nonzero(attr == _NOISY)[:, 0]
    if len(noisy):
        if noise is None:
            draw = torch.randn((len(noisy), 3, res, res), generator=generator, device=device, dtype=torch.float32)
            draw = draw * float(np.float32(world.NOISE_STD))
        else:
            draw = noise.to(device, torch.float32)[noisy]
        img[noisy] = img[noisy] + draw
    dark = torch.nonzero(attr == _DARK)[:, 0]
    if len(dark):
        img[dark] = img[dark] * float(np.float32(world.DARK_GAIN))
    striped = torch.nonzero(attr == _STRIPED)[:, 0]
    if len(striped):
        rows = torch.from_numpy(world.stripe_rows(res)).to(device)
        sub = img[striped]
        sub[:, :, rows] = sub[:, :, rows] * float(np.float32(world.STRIPE_GAIN))
        img[striped] = sub
    return img.round().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- captions


class CaptionTokens:
    """Token ids of `world.caption` for a SceneSpecs batch, built from a tokenizer's own ids.

    A caption is a sequence of world words and commas; each is tokenised once, alone, at
    construction (a word may take several tokens: the shipped tokenizer splits "sand" in two),
    and the (N, 77) ids are assembled by scattering the pieces into place: <bos>, per named
    object "a X" followed by ",", "and" or nothing, the background phrase (or "a view of the B"
    when no object is named), ", A" for a named attribute, <eos>, then padding, exactly like
    ``tokenizer(captions, padding="max_length", max_length=77, truncation=True)``.
    """

    def __init__(self, tokenizer, max_length: int = MAX_TOKENS):
        self.max_length = max_length
        enc = {w: tokenizer(w, add_special_tokens=False).input_ids for w in list(world.VOCABULARY) + [","]}
        if any(not ids for ids in enc.values()):
            raise ValueError("the tokenizer maps a world word to no token")
        self.width = max(len(ids) for ids in enc.values())  # tokens of the longest word
        self.enc = enc
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def _words(self, words: list[str]) -> list[int]:
        """The ids of `words`, each padded with -1 to `width` (a fixed-width row)."""
        return [i for w in words for i in self.enc[w] + [-1] * (self.width - len(self.enc[w]))]

    def _tables(self, device) -> dict[str, torch.Tensor]:
        t = self._cache.get(str(device))
        if t is None:
            phrase = [world.BACKGROUND_PHRASES[b].split() for b in world.BACKGROUND_NAMES]
            longest = max(5, *(len(p) for p in phrase))
            w = self.width
            t = self._cache[str(device)] = {
                "a": torch.tensor(self._words(["a"]), device=device),  # (w,)
                "and": torch.tensor(self._words(["and"]), device=device),
                "comma": torch.tensor(self._words([","]), device=device),
                "obj": torch.tensor([self._words([o]) for o in world.OBJECT_NAMES], device=device),  # (5, w)
                "attr": torch.tensor([self._words([a]) for a in world.ATTRIBUTES], device=device),  # (4, w)
                "phrase": torch.tensor([self._words(p) + [-1] * w * (longest - len(p)) for p in phrase], device=device),
                "view": torch.tensor([self._words(["a", "view", "of", "the", b]) + [-1] * w * (longest - 5)
                                      for b in world.BACKGROUND_NAMES], device=device),
            }
        return t

    def ids(self, specs: SceneSpecs) -> torch.Tensor:
        """(N, max_length) int64 token ids on the specs' device."""
        device = specs.background.device
        t = self._tables(device)
        n = len(specs)
        k = (specs.named >= 0).sum(1)[:, None]  # (N, 1) named objects
        row = lambda v: v[None, :].expand(n, -1)  # noqa: E731
        pieces = [torch.full((n, 1), self.bos, device=device, dtype=torch.long)]  # each (N, L), -1 = absent
        for j in range(world.MAX_OBJECTS):
            has = j < k
            obj = t["obj"][specs.named[:, j].clamp(min=0)]
            sep = torch.where(j == k - 2, row(t["and"]), row(t["comma"]))
            pieces += [row(t["a"]).masked_fill(~has, -1), obj.masked_fill(~has, -1), sep.masked_fill(~(j < k - 1), -1)]
        pieces.append(torch.where(k > 0, t["phrase"][specs.background], t["view"][specs.background]))
        named_attr = (specs.attribute_named & (specs.attribute >= 0))[:, None]
        pieces += [row(t["comma"]).masked_fill(~named_attr, -1),
                   t["attr"][specs.attribute.clamp(min=0)].masked_fill(~named_attr, -1),
                   torch.full((n, 1), self.eos, device=device, dtype=torch.long)]
        pieces = torch.cat(pieces, 1)  # (N, P)
        valid = pieces >= 0
        pos = valid.long().cumsum(1) - 1
        if int(pos[:, -1].max()) >= self.max_length:  # cannot happen for the world's captions (<= 16 tokens)
            raise ValueError(f"a caption is longer than {self.max_length} tokens")
        out = torch.full((n, self.max_length + 1), self.pad, dtype=torch.long, device=device)
        pos = torch.where(valid, pos, self.max_length)  # absent pieces land in a column that is dropped
        return out.scatter_(1, pos, torch.where(valid, pieces, self.pad))[:, : self.max_length]


def make_batch(n: int, generator: torch.Generator, tokens: CaptionTokens, **world_kwargs):
    """n fresh (uint8 images (n, 3, 32, 32), token ids (n, 77)) on the generator's device."""
    specs = sample_specs(n, generator, **world_kwargs)
    return render(specs, generator), tokens.ids(specs)
