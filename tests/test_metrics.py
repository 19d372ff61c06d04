"""Background preservation metrics (negstudy.metrics) on synthetic pairs with known differences."""

import itertools
import logging
import math

import numpy as np
import pytest

from negstudy import metrics
from negstudy.metrics import background_scores, background_scores_batch, lpips_scores, lpips_unavailable

KEYS = ("psnr", "ssim", "psnr_out", "ssim_out", "psnr_weighted", "ssim_weighted")


def base_image(size=32, seed=0):
    """Textured uint8 (size, size, 3) in 64..191, so +-64 of noise never clips."""
    rng = np.random.default_rng(seed)
    return rng.integers(64, 192, size=(size, size, 3)).astype(np.uint8)


def square_mask(size=32, lo=11, hi=21):
    mask = np.zeros((size, size), bool)
    mask[lo:hi, lo:hi] = True
    return mask


def with_noise(image, where, amplitude, seed=1):
    noise = np.random.default_rng(seed).uniform(-1, 1, size=image.shape)
    out = image.astype(np.float64) + amplitude * noise * where[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def test_identical_images_score_perfectly():
    image, mask = base_image(), square_mask()
    for m in (mask, None):
        s = background_scores(image, image.copy(), m)
        assert all(math.isinf(s[k]) and s[k] > 0 for k in ("psnr", "psnr_out", "psnr_weighted"))
        assert all(s[k] == pytest.approx(1.0, abs=1e-6) for k in ("ssim", "ssim_out", "ssim_weighted"))
    assert background_scores(image, image, None)["out_fraction"] == 1.0


def test_noise_inside_the_mask_leaves_the_masked_out_scores_perfect():
    image, mask = base_image(), square_mask()
    edited = with_noise(image, mask, 60)
    s = background_scores(image, edited, mask)
    assert math.isinf(s["psnr_out"]) and math.isinf(s["psnr_weighted"])  # weight 0 on the object itself
    assert s["ssim_out"] == pytest.approx(1.0, abs=1e-6)  # only windows wholly outside the dilated mask
    assert s["ssim_weighted"] > s["ssim"]
    assert s["psnr"] < 30 and s["ssim"] < 0.99  # the whole image sees the noise
    whole = background_scores(image, edited, None)
    assert whole["psnr_out"] == pytest.approx(s["psnr"]) and whole["ssim_out"] == pytest.approx(s["ssim"])
    assert 0 < s["out_fraction"] < 1 - mask.mean()  # the dilation took a margin


@pytest.mark.parametrize("size", [32, 512])
def test_noise_outside_lowers_every_score_monotonically(size):
    image, mask = base_image(size), square_mask(size, size // 3, 2 * size // 3)
    rows = [background_scores(image, with_noise(image, ~mask, a), mask) for a in (2, 8, 24, 64)]
    for key in ("psnr_out", "ssim_out", "psnr_weighted", "ssim_weighted", "psnr", "ssim"):
        values = [r[key] for r in rows]
        assert all(a > b for a, b in itertools.pairwise(values)), (key, values)
    assert rows[0]["ssim_out"] < 1.0 and np.isfinite(rows[0]["psnr_out"])


def test_known_mse_gives_the_expected_psnr():
    image, mask = base_image(), square_mask()
    edited = image.copy()
    edited[~mask] += 10  # error 10 on every channel outside: MSE 100 there
    edited[mask] = 0  # the object is gone: must not count
    expected = 10 * math.log10(255**2 / 100)  # 28.13 dB
    s = background_scores(image, edited, mask, dilate=0)
    assert s["psnr_out"] == pytest.approx(expected, abs=1e-3)
    assert s["psnr_weighted"] == pytest.approx(expected, abs=1e-3)  # weight 0 inside, errors 10 everywhere else
    assert s["out_fraction"] == pytest.approx(1 - mask.mean())
    everywhere = image + np.uint8(10)
    assert background_scores(image, everywhere, None)["psnr"] == pytest.approx(expected, abs=1e-3)


def test_batch_matches_single_pairs_and_takes_mask_lists():
    refs = np.stack([base_image(seed=s) for s in range(3)])
    masks = [square_mask(), None, square_mask(32, 2, 8)]
    edits = np.stack([with_noise(r, np.ones((32, 32), bool), 4 * (i + 1), seed=i) for i, r in enumerate(refs)])
    batch = background_scores_batch(refs, edits, masks)
    for r, e, m, row in zip(refs, edits, masks, batch):
        single = background_scores(r, e, m)
        assert all(row[k] == pytest.approx(single[k], rel=1e-6) for k in KEYS)
    as_array = background_scores_batch(refs, edits, np.stack([square_mask()] * 3))
    assert as_array[0]["psnr_out"] == pytest.approx(batch[0]["psnr_out"], rel=1e-6)
    with pytest.raises(ValueError, match="mask 0 has shape"):
        background_scores_batch(refs, edits, [np.zeros((16, 16), bool), None, None])
    with pytest.raises(ValueError, match="2 masks for 3"):
        background_scores_batch(refs, edits, [None, None])


def test_ssim_window_fits_the_image():
    assert metrics.ssim_sigma(32, 32) == 1.0 and metrics.ssim_radius(1.0) == 4
    assert metrics.ssim_sigma(512, 512) == 1.5 and metrics.ssim_radius(1.5) == 5
    assert metrics.default_dilate(32, 32) == 1 and metrics.default_dilate(512, 512) == 8


def test_lpips_without_local_weights_returns_none_with_one_notice(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: the backbone is not there
    monkeypatch.setattr(metrics, "_lpips_notice_given", False)
    reason = lpips_unavailable("alex")
    assert reason is not None and ("torchvision" in reason or str(tmp_path) in reason)
    image = base_image()[None]
    with caplog.at_level(logging.WARNING, logger="negstudy"):
        assert lpips_scores(image, image) is None
        assert lpips_scores(image, image, [square_mask()]) is None
    notices = [r for r in caplog.records if "LPIPS" in r.getMessage()]
    assert len(notices) == 1 and reason in notices[0].getMessage()
    with pytest.raises(ValueError, match="allowed values are alex, vgg, squeeze"):
        lpips_unavailable("resnet")


@pytest.mark.skipif(lpips_unavailable("alex") is not None, reason="LPIPS weights are not available offline here")
def test_lpips_when_available():
    image, mask = base_image(64), square_mask(64, 20, 40)
    edited = with_noise(image, mask, 60)
    same, masked, whole = lpips_scores(image[None], image[None]), lpips_scores(image[None], edited[None], [mask]), \
        lpips_scores(image[None], edited[None])
    assert same[0] == pytest.approx(0, abs=1e-6) and masked[0] == pytest.approx(0, abs=1e-6) and whole[0] > 0
