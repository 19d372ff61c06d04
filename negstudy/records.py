"""What a job leaves on disk: PNGs with their provenance, tidy parquet tables, atomically written.

Every file is written to a temporary name in the same directory and renamed into place, so a
job killed at any moment leaves each file either complete or absent, never half written.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
import unicodedata
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe fragment of ``text``: ASCII letters, digits, '-' and '_' only; never empty,
    never '.' or '..', never a path separator (prompt text cannot escape the output directory)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return text[:max_len].strip("-") or "empty"


def strip_name(caption: int, prompt: str, seed: int, obj: str) -> str:
    """File name of a removal strip (original | from-0 | window | adaptive) under ``<job>/triples/``."""
    return f"{caption:03d}_{slug(prompt)}_s{seed}_{slug(obj, 20)}.png"


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_png(image: np.ndarray, path: Path, metadata: dict) -> None:
    """image: (H, W, 3) float in [0, 1] or uint8. ``metadata`` goes into PNG text chunks."""
    if image.dtype != np.uint8:
        image = to_uint8(image)
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(str(key), str(value))
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounding as diffusers' numpy_to_pil does."""
    return (images * 255).round().clip(0, 255).astype(np.uint8)


def write_table(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# --------------------------------------------------------------------- directories (training checkpoints)


def fresh_tmp_dir(final: Path) -> Path:
    """An empty ``<final>.tmp`` directory to fill before :func:`replace_dir` moves it onto ``final``."""
    tmp = Path(final).with_name(Path(final).name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` onto ``final``. Between the two renames the previous
    version survives as ``<final>.old`` (see :func:`find_checkpoint`), so a kill loses neither."""
    old = Path(final).with_name(Path(final).name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def find_checkpoint(out: Path, marker: str = "state.pt") -> Path | None:
    """``out/checkpoint``, or ``out/checkpoint.old`` if a kill hit :func:`replace_dir` between its renames."""
    for name in ("checkpoint", "checkpoint.old"):
        if (Path(out) / name / marker).exists():
            return Path(out) / name
    return None


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
