"""Label sets that restrict what detectors and judges may name.

``coco``: the 80 object classes of COCO (the paper's judge lists objects among them);
``shapes``: the shapes world's objects. Any other value is read as a text file, one label per line.
"""

from __future__ import annotations

from pathlib import Path

from negstudy.errors import ConfigError

COCO_80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


def label_set(spec: str, key: str = "evaluator.labels") -> tuple[str, ...]:
    """The labels named by ``spec`` (coco, shapes, or a path to a one-label-per-line file)."""
    if spec == "coco":
        return COCO_80
    if spec == "shapes":
        from negstudy.shapes.world import OBJECT_NAMES

        return OBJECT_NAMES
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={spec!r}: allowed values are coco, shapes, or a text file with one label per line")
    labels = tuple(dict.fromkeys(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))
    if not labels:
        raise ConfigError(f"{key}={spec!r}: the file holds no labels")
    return labels
