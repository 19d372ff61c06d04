"""Background preservation: how much an edit changed an image OUTSIDE the object it removed.

An edited image (a negative applied by some schedule) is compared with its reference (the image of
the same prompt and seed without a negative) away from the removed object's region ``mask``
(bool (H, W), e.g. the object's mask in the reference; None = the whole image). Images are uint8
(H, W, 3). Two ways to leave the object out:

- **masked-out** (``psnr_out``, ``ssim_out``): only pixels outside the mask dilated by ``dilate``
  pixels count (the object's outline, shadow and anti-aliasing move with it). SSIM at a pixel
  compares the Gaussian windows around it, so ``ssim_out`` averages torchmetrics' full SSIM map
  over the pixels whose WHOLE window also lies outside the dilated mask: a change inside the
  object never reaches it. NaN when no pixel is left;
- **mask-weighted** (``psnr_weighted``, ``ssim_weighted``): every pixel counts with weight
  ``1 - soft``, ``soft`` = the mask blurred by a Gaussian of ``soften`` pixels and never below the
  mask itself (weight 0 on the object, rising to 1 away from it): no hard margin to choose.

``psnr`` / ``ssim`` are the whole-image scores. PSNR is in dB over the 0..255 range (inf for
identical pixels); SSIM uses a Gaussian window of sigma 1.5 px (11 x 11, Wang et al. 2004) on
images of 64 px and more, and sigma 1.0 px (9 x 9) below, so that a window fits the 32 px shapes
world several times over. Defaults scale with the image: ``dilate`` = side / 64 (at least 1 px:
1 px at 32 px, 8 px at 512 px), ``soften`` = side / 32 (at least 1 px).

LPIPS (:func:`lpips_scores`) needs torchvision and the backbone's ImageNet weights in the torch hub
cache; negstudy never downloads them: without them it returns None and says why once per process.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("negstudy")

SSIM_SIGMA = 1.5  # px, images of SMALL_IMAGE px and more
SSIM_SIGMA_SMALL = 1.0  # px, smaller images (the 32 px shapes world)
SMALL_IMAGE = 64
PIXEL_BUDGET = 2**20  # pixels per chunk of the batched SSIM (~80 MB of float32 intermediates)


def ssim_sigma(height: int, width: int) -> float:
    """The SSIM Gaussian's sigma (px) used for an image of this size."""
    return SSIM_SIGMA if min(height, width) >= SMALL_IMAGE else SSIM_SIGMA_SMALL


def ssim_radius(sigma: float) -> int:
    """Half-width (px) of torchmetrics' Gaussian SSIM window for ``sigma``."""
    return int(3.5 * sigma + 0.5)


def default_dilate(height: int, width: int) -> int:
    return max(1, round(min(height, width) / 64))


def default_soften(height: int, width: int) -> float:
    return max(1.0, min(height, width) / 32)


def background_scores(reference: np.ndarray, edited: np.ndarray, mask: np.ndarray | None = None, *,
                      dilate: int | None = None, soften: float | None = None) -> dict[str, float]:
    """Scores of one pair (uint8 (H, W, 3) each, mask bool (H, W) or None); see the module doc.

    Keys: psnr, ssim (whole image), psnr_out, ssim_out (masked-out), psnr_weighted, ssim_weighted
    (mask-weighted), out_fraction (share of pixels counted by psnr_out)."""
    return background_scores_batch(reference[None], edited[None], None if mask is None else [mask],
                                   dilate=dilate, soften=soften)[0]


def background_scores_batch(references: np.ndarray, edited: np.ndarray, masks=None, *, dilate: int | None = None,
                            soften: float | None = None) -> list[dict[str, float]]:
    """:func:`background_scores` for N pairs of one size: uint8 (N, H, W, 3) each; ``masks`` a bool
    (N, H, W) array, a list of (H, W) masks or None entries, or None for no masks at all."""
    references, edited = np.asarray(references), np.asarray(edited)
    if references.shape != edited.shape or references.ndim != 4 or references.shape[-1] != 3:
        raise ValueError(f"references {references.shape} and edited {edited.shape}: expected two uint8 (N, H, W, 3) arrays")
    n, h, w, _ = references.shape
    if masks is not None and len(masks) != n:
        raise ValueError(f"{len(masks)} masks for {n} image pairs")
    sigma = ssim_sigma(h, w)
    dilate = default_dilate(h, w) if dilate is None else int(dilate)
    soften = default_soften(h, w) if soften is None else float(soften)

    from torchmetrics.functional.image import structural_similarity_index_measure  # ~2.7 s to import: not at startup

    rows = []
    chunk = max(1, PIXEL_BUDGET // (h * w))
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        region = _masks(None if masks is None else masks[sl], len(references[sl]), h, w, first=start)
        out = _dilate(region, dilate)  # excluded from psnr_out
        out_ssim = _dilate(region, dilate + ssim_radius(sigma))  # ... and from ssim_out: whole windows outside
        weight = (1.0 - torch.maximum(region, _blur(region, soften))).clamp(0.0, 1.0)
        ref, edt = _tensor(references[sl]), _tensor(edited[sl])
        _, ssim_map = structural_similarity_index_measure(edt, ref, sigma=sigma, data_range=255.0, reduction="none",
                                                          return_full_image=True)
        ssim_map = ssim_map.mean(1)  # (B, H, W): channels averaged, as torchmetrics' own score does
        sq_err = ((edt - ref) ** 2).mean(1)  # (B, H, W)
        for i in range(ref.shape[0]):
            keep, keep_ssim, wt = ~out[i], ~out_ssim[i], weight[i]
            rows.append({
                "psnr": _psnr(edt[i], ref[i]),
                "ssim": float(ssim_map[i].mean()),
                "psnr_out": _psnr(edt[i][:, keep], ref[i][:, keep]) if keep.any() else math.nan,
                "ssim_out": float(ssim_map[i][keep_ssim].mean()) if keep_ssim.any() else math.nan,
                "psnr_weighted": _psnr_from_mse(_weighted_mean(sq_err[i], wt)),
                "ssim_weighted": _weighted_mean(ssim_map[i], wt),
                "out_fraction": float(keep.double().mean()),
            })
    return rows


def _tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in 0..255."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32)


def _masks(masks, n: int, h: int, w: int, first: int = 0) -> torch.Tensor:
    """float32 (N, H, W) of 0/1 from None, a bool array, or a list of masks / None (pairs first, first + 1, ...)."""
    region = torch.zeros((n, h, w), dtype=torch.float32)
    if masks is None:
        return region
    if len(masks) != n:
        raise ValueError(f"{len(masks)} masks for {n} image pairs")
    for i, m in enumerate(masks):
        if m is None:
            continue
        m = np.asarray(m)
        if m.shape != (h, w):
            raise ValueError(f"mask {first + i} has shape {m.shape}, the images ({h}, {w})")
        region[i] = torch.from_numpy(m.astype(bool)).to(torch.float32)
    return region


def _dilate(region: torch.Tensor, radius: int) -> torch.Tensor:
    """Bool (N, H, W): the region grown by ``radius`` px (square structuring element)."""
    if radius <= 0:
        return region > 0.5
    return F.max_pool2d(region[:, None], 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0.5


def _blur(region: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, H, W) blurred by a separable Gaussian of ``sigma`` px (zero outside the image)."""
    if sigma <= 0:
        return region
    r = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    out = F.conv2d(region[:, None], g.view(1, 1, 1, -1), padding=(0, r))
    return F.conv2d(out, g.view(1, 1, -1, 1), padding=(r, 0))[:, 0]


def _psnr(preds: torch.Tensor, target: torch.Tensor) -> float:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(preds, target, data_range=255.0))


def _psnr_from_mse(mse: float) -> float:
    if math.isnan(mse):
        return math.nan
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> float:
    total = float(weight.sum())
    return float((values * weight).sum()) / total if total > 0 else math.nan


# ---------------------------------------------------------------------------------------------
# LPIPS (torchmetrics' LearnedPerceptualImagePatchSimilarity), only when its weights are local

_BACKBONES = {"alex": ("alexnet", "AlexNet_Weights"), "vgg": ("vgg16", "VGG16_Weights"),
              "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights")}
_lpips_notice_given = False
_lpips_models: dict[tuple[str, str], torch.nn.Module] = {}


def lpips_unavailable(net: str = "alex") -> str | None:
    """Why LPIPS with backbone ``net`` cannot run offline here, or None when it can. Checks only
    files and imports: torchvision, torchmetrics' shipped linear heads, and the backbone's ImageNet
    weights in the torch hub cache (``torch.hub.get_dir()/checkpoints``, set by TORCH_HOME)."""
    if net not in _BACKBONES:
        raise ValueError(f"LPIPS net {net!r}: allowed values are {', '.join(_BACKBONES)}")
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed (pip install torchvision)"
    import torchmetrics.functional.image.lpips as tm_lpips
    import torchvision

    heads = Path(tm_lpips.__file__).parent / "lpips_models" / f"{net}.pth"
    if not heads.is_file():
        return f"torchmetrics' LPIPS heads are missing ({heads})"
    arch, weights_name = _BACKBONES[net]
    url = getattr(torchvision.models, weights_name).DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not cached.is_file():
        return (f"the {arch} ImageNet weights are not in the torch hub cache ({cached}); fetch them once where the "
                f"network is reachable: python -c \"import torchvision; torchvision.models.{arch}(weights='DEFAULT')\"")
    return None


def lpips_scores(references: np.ndarray, edited: np.ndarray, masks=None, *, net: str = "alex",
                 dilate: int | None = None, batch_size: int = 16, device: str = "cpu") -> list[float] | None:
    """LPIPS distance (lower = more alike) of N pairs, uint8 (N, H, W, 3) each; None when LPIPS is
    not available offline (one log notice per process says why). With ``masks`` (as in
    :func:`background_scores_batch`) the object's region, dilated by ``dilate`` px, is copied from
    the reference into the edited image first, so only changes outside it count."""
    global _lpips_notice_given
    reason = lpips_unavailable(net)
    if reason is not None:
        if not _lpips_notice_given:
            log.warning("LPIPS skipped (reported as missing): %s", reason)
            _lpips_notice_given = True
        return None
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    references, edited = np.asarray(references), np.asarray(edited)
    n, h, w, _ = references.shape
    if masks is not None:
        keep_ref = _dilate(_masks(masks, n, h, w), default_dilate(h, w) if dilate is None else int(dilate)).numpy()
        edited = np.where(keep_ref[..., None], references, edited)
    key = (net, device)
    if key not in _lpips_models:
        _lpips_models[key] = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=True).to(device).eval()
    metric = _lpips_models[key]
    scores = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            a = torch.from_numpy(np.ascontiguousarray(references[sl])).permute(0, 3, 1, 2).float().div(255).to(device)
            b = torch.from_numpy(np.ascontiguousarray(edited[sl])).permute(0, 3, 1, 2).float().div(255).to(device)
            metric.update(b, a)
            scores += metric.compute().reshape(-1).tolist()
            metric.reset()
    return [float(s) for s in scores]
