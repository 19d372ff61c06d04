"""CLIP score and zero-shot presence with transformers' ``CLIPModel``.

``path: auto`` is the small CLIP trained on the shapes world and shipped in the package
(``builtin:shapes_clip``, card in ``negstudy/models/shapes_clip/README.md``) when the model draws
the shapes world, else ``openai/clip-vit-large-patch14`` (the CLIP of the CLIP-score literature).

CLIP score (Hessel et al. 2021, torchmetrics' ``CLIPScore``): ``100 * max(cos(image, text), 0)``
with the model's projected, L2-normalised embeddings; per image, in [0, 100].

Presence is zero-shot, by comparing captions that name the object with captions that lack it:

- shapes world, object nouns (ball, sun, box, tree, kite): every caption the world can write
  naming all of an image's content (0-3 objects, a background, an attribute or none: 520
  captions, written by ``world.caption``) is scored; the object is present iff the best caption
  naming it beats the best caption lacking it, i.e. iff the best caption names it. ``objects``
  reads the objects of that best caption. Measured against the oracle in the model card.
- any other model: ``d = cos(image, "a photo of a {name}") - cos(image, "a photo")`` for an object,
  ``cos(image, "a {name} photo") - cos(image, "a photo")`` for an attribute ("blurry",
  "unpleasant"); present if ``d > margin``, absent if ``d < -margin``, unsure (None) between
  (``evaluator.margin``, cosine units; 0 answers every image). Not measured against labels here
  (the hub is out of reach); treat it as a screen whose unsure band you tune on your images.
- shapes world, a name that is not a world object: no answer (None); an attribute: whether the
  best caption names it. The studies' reader on the shapes world reads with the shapes CLIP's
  margins instead (:func:`negstudy.evaluators.ensemble.clip_readings`: objects, background and
  attribute, each with an unsure band; :mod:`negstudy.evaluators.reader`).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from negstudy.models import resolve_model_path
from negstudy.errors import ConfigError, ModelNotFoundError

SHAPES_CLIP = "builtin:shapes_clip"
OPENAI_CLIP = "openai/clip-vit-large-patch14"
GENERIC_NAMED = "a photo of a {name}"
GENERIC_ATTRIBUTE = "a {name} photo"
GENERIC_LACKING = "a photo"


def resolve_clip_path(path: str, model_world: str | None) -> tuple[str, bool]:
    """(directory or hub id for ``from_pretrained``, whether it is local); ConfigError if unusable."""
    if path == "auto":
        path = SHAPES_CLIP if model_world == "shapes" else OPENAI_CLIP
    return resolve_model_path(path, key="evaluator.path", marker="config.json", kind="CLIP ",
                              hint=f"a directory written by CLIPModel.save_pretrained, {SHAPES_CLIP} or a hub id such as {OPENAI_CLIP}")


def shapes_captions() -> tuple[list[str], list[frozenset[str]]]:
    """Every full world caption (objects in canonical order) and the object set each one names."""
    from negstudy.shapes import world

    captions, named = [], []
    for k in range(world.MAX_OBJECTS + 1):
        for objects in itertools.combinations(world.OBJECT_NAMES, k):
            for background in world.BACKGROUND_NAMES:
                for attribute in (None,) + world.ATTRIBUTES:
                    scene = world.Scene(background, (), attribute, objects, attribute is not None)
                    captions.append(world.caption(scene))
                    named.append(frozenset(objects))
    return captions, named


class ClipEvaluator:
    name = "clip"
    locates = False
    kinds = ("object", "attribute")

    def __init__(self, model, processor, *, world: str | None = None, batch_size: int = 64, device="cpu",
                 margin: float = 0.0):
        self.model = model.eval()
        self.processor = processor
        self.world = world
        self.margin = float(margin)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._decoder = None  # (caption embeddings (C, D), named object sets), built on first use

    @classmethod
    def build(cls, *, world: str | None = None, **settings) -> "ClipEvaluator":
        """The target of conf/evaluator/clip.yaml: ClipConfig's keys as keyword arguments."""
        from negstudy.config import ClipConfig
        from negstudy.evaluators import settings_node

        return cls.from_config(settings_node(ClipConfig, settings, "clip"), world)

    @classmethod
    def from_config(cls, cfg_evaluator, model_world: str | None) -> "ClipEvaluator":
        from transformers import CLIPModel, CLIPProcessor

        from negstudy.models import pick_device

        path, local = resolve_clip_path(cfg_evaluator.path, model_world)
        kwargs = dict(local_files_only=bool(cfg_evaluator.local_files_only) or local)
        try:
            model = CLIPModel.from_pretrained(path, dtype=torch.float32, **kwargs)
            processor = CLIPProcessor.from_pretrained(path, **kwargs)
        except OSError as err:
            if local:
                raise ConfigError(f"evaluator.path={cfg_evaluator.path!r}: {path} does not load as a CLIP model ({str(err).splitlines()[0][:200]})") from err
            raise ModelNotFoundError(
                f"evaluator.path={path!r}: the CLIP model is not available here ({str(err).strip().splitlines()[0][:200]}). "
                f"On a machine with internet run `hf download {path} --local-dir <DIR>`, copy <DIR> here and set evaluator.path=<DIR>"
            ) from err
        device = pick_device("auto")
        margin = float(cfg_evaluator.get("margin", 0.0))
        if margin < 0:
            raise ConfigError(f"evaluator.margin={margin}: must be >= 0 (cosine units; 0 = no unsure band)")
        return cls(model.to(device), processor, world=model_world, batch_size=cfg_evaluator.batch_size, device=device,
                   margin=margin)

    # ------------------------------------------------------------------ embeddings

    @torch.no_grad()
    def image_embeds(self, images: np.ndarray) -> torch.Tensor:
        """images: uint8 (B, H, W, 3). Returns float (B, D), unit norm, on CPU."""
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[i:i + self.batch_size]), return_tensors="pt").pixel_values
            emb = self.model.get_image_features(pixel_values=pixels.to(self.device))
            out.append(_unit(_features(emb)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """Float (T, D), unit norm, on CPU; each distinct text is encoded once per evaluator."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            tok = self.processor(text=chunk, return_tensors="pt", padding=True, truncation=True)
            emb = self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                               attention_mask=tok.attention_mask.to(self.device))
            for text, e in zip(chunk, _unit(_features(emb)).float().cpu()):
                self._text_cache[text] = e
        if not texts:
            return torch.zeros(0, self.model.config.projection_dim)
        return torch.stack([self._text_cache[t] for t in texts])

    # ------------------------------------------------------------------ protocol

    def score(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """CLIP score of image i against text i: float (B,), 100 * max(cos, 0)."""
        if len(images) != len(texts):
            raise ValueError(f"score: {len(images)} images but {len(texts)} texts")
        cos = (self.image_embeds(images) * self.text_embeds(list(texts))).sum(-1)
        return (100.0 * cos.clamp(min=0)).numpy().astype(np.float64)

    def evaluate(self, images: np.ndarray, items) -> list[dict]:
        """Columns clip_prompt and clip_negative (NaN for an empty negative: no caption to score)."""
        img = self.image_embeds(images)
        prompts = self.text_embeds([it.prompt for it in items])
        negatives = self.text_embeds([it.negative or "" for it in items])
        s_prompt = 100.0 * (img * prompts).sum(-1).clamp(min=0)
        s_negative = 100.0 * (img * negatives).sum(-1).clamp(min=0)
        return [
            {"clip_prompt": float(p), "clip_negative": float(n) if it.negative else float("nan")}
            for it, p, n in zip(items, s_prompt, s_negative)
        ]

    def present(self, images: np.ndarray, names: Sequence[str], kind: str = "object") -> list[bool | None]:
        """Whether concept ``names[i]`` is in image ``i`` (module docstring); None where unsure."""
        if len(images) != len(names):
            raise ValueError(f"present: {len(images)} images but {len(names)} names")
        if self.world == "shapes":
            img = self.image_embeds(images)
            if kind == "attribute":  # the best full caption's attribute, as for objects
                return [a == name for name, a in zip(names, self._decode(img, "attribute"))]
            found = self._decode(img)
            return [(name in f) if name in self._world_objects() else None for name, f in zip(names, found)]
        img = self.image_embeds(images)
        template = GENERIC_ATTRIBUTE if kind == "attribute" else GENERIC_NAMED
        named = (img * self.text_embeds([template.format(name=n) for n in names])).sum(-1)
        lacking = img @ self.text_embeds([GENERIC_LACKING])[0]
        d = (named - lacking).numpy()
        return [True if x > self.margin else False if x < -self.margin else None for x in d]

    def objects(self, images: np.ndarray, labels: Sequence[str]) -> list[dict[str, None]]:
        """The labels surely present in each image (above the margin; no masks: CLIP does not locate)."""
        img = self.image_embeds(images)
        labels = list(labels)
        if self.world == "shapes":
            return [{o: None for o in labels if o in f} for f in self._decode(img)]
        named = img @ self.text_embeds([GENERIC_NAMED.format(name=n) for n in labels]).T  # (B, L)
        lacking = img @ self.text_embeds([GENERIC_LACKING])[0]
        return [{o: None for o, hit in zip(labels, row > base + self.margin) if hit} for row, base in zip(named, lacking)]

    # ------------------------------------------------------------------ the shapes-world decoder

    def _world_objects(self) -> tuple[str, ...]:
        from negstudy.shapes.world import OBJECT_NAMES

        return OBJECT_NAMES

    def _decode(self, img: torch.Tensor, what: str = "objects") -> list:
        """Per image, the objects (a frozenset) or the attribute (a name or None) of its best full world
        caption. img: (B, D) unit embeddings."""
        if self._decoder is None:
            from negstudy.shapes.world import parse_caption

            captions, named = shapes_captions()
            self._decoder = (self.text_embeds(captions), named, [parse_caption(c).attribute for c in captions])
        caption_embeds, named, attributes = self._decoder
        best = (img @ caption_embeds.T).argmax(-1)
        return [(named if what == "objects" else attributes)[int(i)] for i in best]


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output (pooler_output = projected features); 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
