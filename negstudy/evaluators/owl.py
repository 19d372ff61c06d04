"""Open-vocabulary detection with OWLv2 (Minderer et al. 2023) as an evaluator: which objects of a
label set an image holds, and where (each detection's box, filled, as the object's mask).

Every label becomes the text query ``"a photo of a {label}"``; a predicted box counts for the
query it scores highest (sigmoid of the class logit), when that score is above ``threshold``. OWLv2
pads an image to a square (bottom / right) before resizing it to the model's input size, so boxes
come back in the original image's pixels (x0, y0, x1, y1); they are clipped to the image, and a box
wholly in the padding is dropped.

Images are uint8 (B, H, W, 3). The checkpoint is any ``save_pretrained`` directory of
``Owlv2ForObjectDetection`` + ``Owlv2Processor`` or a hub id; negstudy never downloads silently
when ``local_files_only`` is set, and a missing model stops the job before the diffusion model
loads (``ModelNotFoundError`` with the command that fetches it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from negstudy.errors import ConfigError, ModelNotFoundError

log = logging.getLogger("negstudy")
QUERY = "a photo of a {}"
HINT = "hf download google/owlv2-base-patch16-ensemble --local-dir {dir}"
_preprocess_notice_given = False


@dataclass(frozen=True)
class Detection:
    label: str  # the query's label
    score: float  # sigmoid of the class logit, in (0, 1)
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's pixels, clipped to it


def query(label: str) -> str:
    """The text query of a label: "dog" and "a dog" both ask for "a photo of a dog"."""
    words = label.split()
    if len(words) > 1 and words[0].lower() in ("a", "an", "the"):
        words = words[1:]
    return QUERY.format(" ".join(words))


def _by_score(found: Sequence[Detection]) -> list[str]:
    """The labels of ``found``, each once, by their best score (highest first)."""
    return list(dict.fromkeys(d.label for d in sorted(found, key=lambda d: -d.score)))


def _clip(box, height: int, width: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def box_mask(boxes: Sequence[tuple[float, float, float, float]], height: int, width: int) -> np.ndarray:
    """Bool (H, W): the union of the boxes, each filled over the pixels it touches."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        c0, r0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        c1, r1 = min(width, math.ceil(x1)), min(height, math.ceil(y1))
        mask[r0:r1, c0:c1] = True
    return mask


class OwlEvaluator:
    name = "owl"
    locates = True
    kinds = ("object",)

    def __init__(self, model, processor, labels: Sequence[str], threshold: float = 0.3, batch_size: int = 4,
                 device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.processor = processor
        self.labels = tuple(labels)
        self.threshold = float(threshold)
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device(device)

    @classmethod
    def build(cls, *, world: str | None = None, **settings) -> OwlEvaluator:
        """The target of conf/evaluator/owl.yaml: OwlConfig's keys as keyword arguments (any world)."""
        from negstudy.config import OwlConfig
        from negstudy.evaluators import settings_node

        return cls.from_config(settings_node(OwlConfig, settings, "owl"))

    @classmethod
    def from_config(cls, cfg) -> OwlEvaluator:
        """Load the detector named by ``cfg`` (an OwlConfig node: path, labels, threshold, ...)."""
        from negstudy.labels import label_set
        from negstudy.models import pick_device

        labels = label_set(cfg.labels)
        if cfg.batch_size < 1:
            raise ConfigError(f"evaluator.batch_size={cfg.batch_size}: must be >= 1")
        try:
            device = pick_device(cfg.get("device", "auto"))
        except ConfigError as err:
            raise ConfigError(f"evaluator.{err}") from None
        model, processor = load_owl(str(cfg.path), bool(cfg.local_files_only))
        return cls(model, processor, labels, cfg.threshold, cfg.batch_size, device)

    # -- the evaluator protocol ------------------------------------------------------------------

    def objects(self, images: np.ndarray, labels: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
        """Per image, the labels detected (among ``labels``, default the configured set), most
        confident first, each with the bool (H, W) union of its boxes."""
        labels = tuple(labels) if labels is not None else self.labels
        h, w = images.shape[1:3]
        return [{label: box_mask([d.box for d in found if d.label == label], h, w) for label in _by_score(found)}
                for found in self.detect(images, [labels] * len(images))]

    def present(self, images: np.ndarray, names: Sequence[str], kind: str = "object") -> list[bool | None]:
        """Whether object ``names[i]`` is detected in image ``i`` (its query alone, above threshold);
        None for attributes (a detector finds things, not properties of the whole image)."""
        if kind != "object":
            return [None for _ in names]
        return [bool(found) for found in self.detect(images, [[name] for name in names])]

    def evaluate(self, images: np.ndarray, items) -> list[dict]:
        """Columns: objects detected among the label set (comma-joined, most confident first),
        their count, and for object negatives whether the negative is detected and its best score."""
        rows = []
        found_all = self.detect(images, [self.labels] * len(images))
        negatives = [it.negative if it.negative and getattr(it, "category", "object") == "object" else None
                     for it in items]
        asked = [i for i, neg in enumerate(negatives) if neg]
        negative_hits = dict(zip(asked, self.detect(images[asked], [[negatives[i]] for i in asked], threshold=0.0)
                                 if asked else []))
        for i, found in enumerate(found_all):
            names = _by_score(found)
            best = max((d.score for d in negative_hits.get(i, [])), default=None)
            rows.append({
                "objects": ",".join(names),
                "n_objects": len(names),
                "negative_present": None if best is None else best > self.threshold,
                "negative_score": best,
            })
        return rows

    # -- detection -------------------------------------------------------------------------------

    @torch.no_grad()
    def detect(self, images: np.ndarray, queries: Sequence[Sequence[str]], threshold: float | None = None
               ) -> list[list[Detection]]:
        """Detections per image above ``threshold`` (default: the configured one); ``queries[i]`` are
        the labels image ``i`` is searched for."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images {images.shape}: expected uint8 (B, H, W, 3)")
        if len(queries) != len(images):
            raise ValueError(f"{len(queries)} query lists for {len(images)} images")
        threshold = self.threshold if threshold is None else float(threshold)
        h, w = images.shape[1:3]
        results: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            part, asked = images[start : start + self.batch_size], [list(q) for q in queries[start : start + self.batch_size]]
            if not any(asked):
                results += [[] for _ in asked]
                continue
            text = [[query(label) for label in q] or [" "] for q in asked]
            enc = self.processor(text=text, return_tensors="pt", truncation=True)
            outputs = self.model(input_ids=enc["input_ids"].to(self.device),
                                 attention_mask=enc["attention_mask"].to(self.device),
                                 pixel_values=self._pixel_values(part).to(self.device))
            outputs.logits, outputs.pred_boxes = outputs.logits.float().cpu(), outputs.pred_boxes.float().cpu()
            post = self.processor.image_processor.post_process_object_detection(
                outputs, threshold=threshold, target_sizes=[(h, w)] * len(part))
            for q, res in zip(asked, post):
                found = []
                for score, index, box in zip(res["scores"].tolist(), res["labels"].tolist(), res["boxes"].tolist()):
                    x0, y0, x1, y1 = _clip(box, h, w)
                    # padded (blank) queries of a shorter list never count, nor boxes in OWLv2's square padding
                    if index < len(q) and x1 > x0 and y1 > y0:
                        found.append(Detection(q[index], float(score), (x0, y0, x1, y1)))
                results.append(found)
        return results

    def _pixel_values(self, images: np.ndarray) -> torch.Tensor:
        """float (B, 3, S, S): the processor's own preprocessing when its backend is installed
        (torchvision, or scipy for the PIL one), else the same steps in torch."""
        global _preprocess_notice_given
        ip = self.processor.image_processor
        try:
            return ip(images=list(images), return_tensors="pt")["pixel_values"]
        except ImportError as err:
            if not _preprocess_notice_given:
                log.warning("OWLv2: the image processor cannot run here (%s); negstudy pads, resizes (bilinear, "
                            "antialiased) and normalizes in torch instead", str(err).strip().splitlines()[0])
                _preprocess_notice_given = True
        return preprocess(images, ip)


def preprocess(images: np.ndarray, ip) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, S, S) as ``Owlv2ImageProcessor`` does: rescale to 0..1, pad
    bottom / right to a square with 0, resize bilinearly to the processor's size, normalize."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if ip.do_rescale:
        x = x * ip.rescale_factor
    h, w = x.shape[-2:]
    if ip.do_pad:
        side = max(h, w)
        x = F.pad(x, (0, side - w, 0, side - h), value=0.0)
    if ip.do_resize:
        x = F.interpolate(x, size=(ip.size["height"], ip.size["width"]), mode="bilinear", align_corners=False,
                          antialias=True)
    if ip.do_normalize:
        mean = torch.tensor(ip.image_mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(ip.image_std, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def load_owl(path: str, local_files_only: bool = False):
    """(Owlv2ForObjectDetection, Owlv2Processor) from a local directory or a hub id."""
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    local = Path(path).expanduser()
    looks_local = path.startswith(("/", "./", "../", "~")) or local.exists()
    hint = HINT.format(dir=local if looks_local else "<dir>")
    if looks_local and not (local / "config.json").is_file():
        raise ModelNotFoundError(f"evaluator.path={path!r}: no OWLv2 checkpoint there (no config.json); fetch one with "
                                 f"`{hint}`")
    source = str(local) if looks_local else path
    try:
        model = Owlv2ForObjectDetection.from_pretrained(source, local_files_only=local_files_only)
        processor = Owlv2Processor.from_pretrained(source, local_files_only=local_files_only)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "this directory" if looks_local else ("the local hub cache" if local_files_only else "the hub")
        raise ModelNotFoundError(f"evaluator.path={path!r}: OWLv2 not loadable from {where} ({first}); fetch it with "
                                 f"`{hint}` and set evaluator.path=<dir>") from None
    return model, processor
