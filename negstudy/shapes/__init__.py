"""The shapes world: procedural 32x32 images with under-describing captions, and an
oracle that reads scenes back from pixels (see `world` and `oracle`)."""

from .oracle import Verdict, inspect, inspect_batch
from .world import (
    ATTRIBUTES,
    BACKGROUNDS,
    OBJECTS,
    RESOLUTION,
    VOCABULARY,
    CaptionSpec,
    ObjectClass,
    PlacedObject,
    Scene,
    caption,
    parse_caption,
    render,
    render_batch,
    sample_dataset,
    sample_scene,
)

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "OBJECTS",
    "RESOLUTION",
    "VOCABULARY",
    "CaptionSpec",
    "ObjectClass",
    "PlacedObject",
    "Scene",
    "Verdict",
    "caption",
    "inspect",
    "inspect_batch",
    "parse_caption",
    "render",
    "render_batch",
    "sample_dataset",
    "sample_scene",
]
