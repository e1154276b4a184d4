import colorsys
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from relicv2_cli.augment import (
    AugmentPreset,
    ViewConfig,
    _gaussian_blur,
    _hue_matrices,
    augment,
    blur_kernel_size,
    byol_jitter,
    center_view,
    crop_resize,
    hsv_to_rgb,
    make_views,
    rgb_to_hsv,
    sample_boxes,
)

OFF = AugmentPreset(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def _images(b=4, h=24, w=24, seed=0):
    return torch.randint(
        0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def _smooth(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g), (h, w), mode="bicubic").clamp(0, 1)


def _plain_cfg(**kw):
    """Only crops: no colour ops, no flip, no blur, identity normalisation."""
    base = dict(presets=(OFF, OFF), small_preset=OFF, blur=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    base.update(kw)
    return ViewConfig(**base)


def test_shapes_and_dtypes():
    cfg = ViewConfig(large_crops=2, small_crops=3, large_size=16, small_size=8)
    views = make_views(
        _images(), cfg, torch.Generator().manual_seed(0), torch.ones(4, 24, 24, dtype=torch.uint8)
    )
    assert len(views.large) == 2 and len(views.small) == 3
    assert all(v.shape == (4, 3, 16, 16) and v.dtype == torch.float32 for v in views.large)
    assert all(v.shape == (4, 3, 8, 8) and v.dtype == torch.float32 for v in views.small)
    assert views.masked.shape == (2, 4) and views.masked.dtype == torch.bool
    assert all(torch.isfinite(v).all() for v in views.large + views.small)


def test_deterministic_with_same_seed():
    cfg = ViewConfig(large_size=16, small_size=8, mask_prob=0.5)
    masks = torch.rand(4, 24, 24, generator=torch.Generator().manual_seed(1)) > 0.5
    a = make_views(_images(), cfg, torch.Generator().manual_seed(3), masks)
    b = make_views(_images(), cfg, torch.Generator().manual_seed(3), masks)
    c = make_views(_images(), cfg, torch.Generator().manual_seed(4), masks)
    for x, y in zip(a.large + a.small, b.large + b.small, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a.masked, b.masked)
    assert not torch.equal(a.large[0], c.large[0])


def _white_with_left_mask(b=8, size=16):
    images = torch.full((b, 3, size, size), 255, dtype=torch.uint8)
    masks = torch.zeros(b, size, size, dtype=torch.uint8)
    masks[:, :, : size // 2] = 1  # foreground = left half; background (right half) goes black
    return images, masks


def test_masking_full_image_large_only():
    images, masks = _white_with_left_mask()
    cfg = _plain_cfg(large_size=16, small_size=8, large_scale=(1.0, 1.0), ratio=(1.0, 1.0), mask_prob=1.0)
    views = make_views(images, cfg, torch.Generator().manual_seed(0), masks)
    expected = masks.float().unsqueeze(1).expand(-1, 3, -1, -1)
    assert views.masked.all()
    for v in views.large:
        torch.testing.assert_close(v, expected)
    for v in views.small:  # small crops are never masked: no black pixels
        torch.testing.assert_close(v, torch.ones_like(v))


def test_no_masking_when_prob_zero_or_no_masks():
    images, masks = _white_with_left_mask()
    cfg = _plain_cfg(large_size=16, small_size=8, mask_prob=0.0)
    for m in (masks, None):
        views = make_views(images, cfg, torch.Generator().manual_seed(0), m)
        assert not views.masked.any()
        for v in views.large + views.small:  # 1 up to bilinear rounding
            torch.testing.assert_close(v, torch.ones_like(v))


def test_empty_or_tiny_masks_are_not_applied():
    images, masks = _white_with_left_mask(b=6)
    masks[0] = 0  # empty (saliency found nothing)
    masks[1] = 0
    masks[1, :2, :2] = 1  # 4 of 256 pixels: below the default 5%
    cfg = _plain_cfg(large_size=16, small_size=8, large_scale=(1.0, 1.0), ratio=(1.0, 1.0), mask_prob=1.0)
    views = make_views(images, cfg, torch.Generator().manual_seed(0), masks)
    assert views.masked[:, :2].sum() == 0 and views.masked[:, 2:].all()
    for v in views.large:
        torch.testing.assert_close(v[:2], torch.ones_like(v[:2]))  # no black crop
    everything = make_views(images, _plain_cfg(large_size=16, small_size=8, mask_prob=1.0, mask_min_area=0.0),
                            torch.Generator().manual_seed(0), masks)
    assert everything.masked.all()  # --mask-min-area 0: the old behaviour


def test_masking_per_sample_and_per_crop():
    images, masks = _white_with_left_mask(b=64)
    cfg = _plain_cfg(
        large_crops=4, large_size=16, small_size=8, large_scale=(1.0, 1.0), ratio=(1.0, 1.0), mask_prob=0.5
    )
    views = make_views(images, cfg, torch.Generator().manual_seed(0), masks)
    assert 0.3 < views.masked.float().mean().item() < 0.7
    assert not torch.equal(views.masked[0], views.masked[1])  # independent draw per large crop
    for v, flags in zip(views.large, views.masked, strict=True):
        has_black = (v < 1e-3).flatten(1).any(1)
        assert torch.equal(has_black, flags)


def test_mask_is_applied_before_cropping():
    # Crops of a quarter of the area land anywhere: if the mask followed the crop, every masked view
    # would be black on exactly its right half. In image coordinates the black share varies with the box.
    images, masks = _white_with_left_mask(b=64, size=32)
    cfg = _plain_cfg(
        large_crops=1, small_crops=0, large_size=16, large_scale=(0.25, 0.25), ratio=(1.0, 1.0), mask_prob=1.0
    )
    views = make_views(images, cfg, torch.Generator().manual_seed(0), masks)
    v = views.large[0][:, 0]  # (B, 16, 16), columns are constant
    torch.testing.assert_close(v, v[:, :1].expand_as(v))
    assert torch.all(v[..., 1:] <= v[..., :-1] + 1e-6)  # white (foreground) left, black right
    black_share = (v[:, 0] < 0.5).float().mean(1)
    assert black_share.std() > 0.1
    assert (black_share == 0).any() and (black_share == 1).any()


def test_sample_boxes_bounds_and_stats():
    g = torch.Generator().manual_seed(0)
    boxes = sample_boxes(4000, 30, 40, (0.08, 1.0), (3 / 4, 4 / 3), g, "cpu")  # H=30, W=40
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (
        torch.all(x1 >= 0)
        and torch.all(y1 >= 0)
        and torch.all(x2 <= 40 + 1e-4)
        and torch.all(y2 <= 30 + 1e-4)
    )
    w, h = x2 - x1, y2 - y1
    area = w * h / (30 * 40)
    aspect = w / h
    fitted = area < 0.999  # a few samples may take the fallback (whole image)
    assert torch.all(area[fitted] >= 0.08 - 1e-4)
    assert torch.all((aspect[fitted] >= 3 / 4 - 1e-4) & (aspect[fitted] <= 4 / 3 + 1e-4))
    square = sample_boxes(4000, 32, 32, (0.08, 0.5), (3 / 4, 4 / 3), g, "cpu")
    log_aspect = torch.log((square[:, 2] - square[:, 0]) / (square[:, 3] - square[:, 1]))
    assert abs(log_aspect.mean().item()) < 0.01  # log-uniform, symmetric on a square image
    assert log_aspect.std().item() == pytest.approx(2 * math.log(4 / 3) / math.sqrt(12), rel=0.05)
    small = sample_boxes(2000, 32, 32, (0.05, 0.14), (3 / 4, 4 / 3), g, "cpu")
    small_area = (small[:, 2] - small[:, 0]) * (small[:, 3] - small[:, 1]) / 1024
    assert small_area.min() >= 0.05 - 1e-4 and small_area.max() <= 0.14 + 1e-4


def test_sample_boxes_fallback_like_torchvision():
    # A 2:1 box of the full area never fits a square: centre crop with the aspect clamped into `ratio`.
    boxes = sample_boxes(3, 20, 20, (1.0, 1.0), (2.0, 2.0), torch.Generator().manual_seed(0), "cpu")
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 5.0, 20.0, 15.0]] * 3))


def test_roi_align_crop_matches_reference():
    img = _smooth(32, 32)
    # Whole image at its own size: the identity.
    torch.testing.assert_close(
        crop_resize(img, torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.tensor([0]), 32), img
    )
    # Upscaling a crop: bilinear, equal to torchvision's resized_crop away from the crop border
    # (roi_align reads real neighbours outside the crop where resize clamps to the edge).
    out = crop_resize(img, torch.tensor([[3.0, 5.0, 15.0, 17.0]]), torch.tensor([0]), 24)
    ref = TF.resized_crop(img, 5, 3, 12, 12, [24, 24], antialias=True)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5, rtol=0)
    assert (out - ref).abs().max() < 0.1
    # Downscaling 3x: antialiased (box filter) vs torchvision's triangle filter.
    img = _smooth(64, 64, seed=1)
    out = crop_resize(img, torch.tensor([[8.0, 4.0, 56.0, 52.0]]), torch.tensor([0]), 16)
    ref = TF.resized_crop(img, 4, 8, 48, 48, [16, 16], antialias=True)
    assert (out - ref).abs().mean() < 0.02
    # Antialiasing: noise downscaled keeps far less variance than point sampling would.
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out = crop_resize(noise, torch.tensor([[0.0, 0.0, 64.0, 64.0]]), torch.tensor([0]), 16)
    assert out.std() < 0.5 * noise.std()


def test_batch_index_selects_source():
    imgs = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    out = crop_resize(imgs, torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 3), torch.tensor([1, 0, 1]), 4)
    assert out[:, 0, 0, 0].tolist() == [1.0, 0.0, 1.0]


def test_flip_and_greyscale_and_solarize():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g)
    flipped = augment(x, [AugmentPreset(flip_p=1.0, jitter_p=0, gray_p=0, blur_p=0, solarize_p=0)], g)
    torch.testing.assert_close(flipped, x.flip(-1))
    grey = augment(x, [AugmentPreset(flip_p=0, jitter_p=0, gray_p=1.0, blur_p=0, solarize_p=0)], g)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    sol = augment(x, [AugmentPreset(flip_p=0, jitter_p=0, gray_p=0, blur_p=0, solarize_p=1.0)], g)
    torch.testing.assert_close(sol, torch.where(x >= 0.5, 1 - x, x))
    same = augment(x, [OFF], g)
    torch.testing.assert_close(same, x)


def test_presets_apply_per_group():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 4, 4, generator=g)
    sol = AugmentPreset(flip_p=0, jitter_p=0, gray_p=0, blur_p=0, solarize_p=1.0)
    out = augment(x, [OFF, sol], g, blur=False)
    torch.testing.assert_close(out[:4], x[:4])
    torch.testing.assert_close(out[4:], torch.where(x[4:] >= 0.5, 1 - x[4:], x[4:]))


def test_hsv_conversions_match_colorsys():
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[0, :, 0, 0] = 0.25  # a grey pixel: hue and saturation 0
    x[0, :, 0, 1] = 0.0  # black
    h, s, v = rgb_to_hsv(x)
    for n, i, j in [(0, 0, 0), (0, 0, 1), (0, 2, 3), (1, 4, 6), (1, 1, 2)]:
        want = colorsys.rgb_to_hsv(*x[n, :, i, j].tolist())
        assert (h[n, i, j].item(), s[n, i, j].item(), v[n, i, j].item()) == pytest.approx(want, abs=1e-12)
    torch.testing.assert_close(hsv_to_rgb(h, s, v), x, atol=1e-12, rtol=0)


def _byol_reference(image: torch.Tensor, brightness, contrast, saturation, hue, order) -> torch.Tensor:
    """One image, BYOL's ops one after the other in its order: the straightforward way."""
    x = image.clone()
    for op in order:
        if op == 0:
            x = (x + brightness).clamp(0, 1)
        elif op == 1:
            mean = x.mean(dim=(1, 2), keepdim=True)  # per channel
            x = ((x - mean) * contrast + mean).clamp(0, 1)
        elif op == 2:  # S scaled in HSV, pixel by pixel
            pixels = [colorsys.rgb_to_hsv(*p) for p in x.reshape(3, -1).T.tolist()]
            rgb = [colorsys.hsv_to_rgb(h, min(max(s * saturation, 0.0), 1.0), v) for h, s, v in pixels]
            x = torch.tensor(rgb, dtype=x.dtype).T.reshape(x.shape).clamp(0, 1)
        else:  # H shifted in HSV: torchvision's adjust_hue does exactly that
            x = TF.adjust_hue(x, hue).clamp(0, 1)
    return x


def test_byol_jitter_matches_a_per_image_reference():
    g = torch.Generator().manual_seed(3)
    n = 12
    x = torch.rand(n, 3, 6, 6, generator=g, dtype=torch.float64)
    brightness = (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1) * 0.4
    contrast = 1 + (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1) * 0.4
    saturation = 1 + (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1) * 0.2
    hue = (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1) * 0.1
    order = torch.rand(n, 4, generator=g).argsort(dim=1)
    apply = torch.ones(n, dtype=torch.bool)
    apply[5] = False
    out = byol_jitter(x, apply, brightness, contrast, saturation, hue, order)
    assert len({tuple(o) for o in order.tolist()}) > 6  # orders really differ between images
    for i in range(n):
        if not apply[i]:
            assert torch.equal(out[i], x[i])
            continue
        want = _byol_reference(x[i], brightness[i].item(), contrast[i].item(), saturation[i].item(),
                               hue[i].item(),
                               order[i].tolist())
        torch.testing.assert_close(out[i], want, atol=1e-6, rtol=0)


def test_byol_jitter_draws_an_order_per_image_and_additive_brightness():
    g = torch.Generator().manual_seed(0)
    brightness_only = AugmentPreset(flip_p=0, jitter_p=1.0, brightness=0.4, contrast=0, saturation=0, hue=0,
                                    gray_p=0, blur_p=0, solarize_p=0)
    grey = torch.full((4000, 3, 2, 2), 0.5)
    shift = (augment(grey, [brightness_only], g) - 0.5)[:, 0, 0, 0]
    # BYOL: x + U(-0.4, 0.4); torchvision would give x * U(0.6, 1.4), i.e. shifts in [-0.2, 0.2] here.
    assert shift.min() < -0.38 and shift.max() > 0.38
    assert shift.mean().abs() < 0.02 and shift.std().item() == pytest.approx(0.8 / math.sqrt(12), rel=0.05)


def test_torchvision_jitter_is_kept_as_an_option():
    g = torch.Generator().manual_seed(0)
    brightness_only = AugmentPreset(flip_p=0, jitter_p=1.0, brightness=0.4, contrast=0, saturation=0, hue=0,
                                    gray_p=0, blur_p=0, solarize_p=0)
    grey = torch.full((2000, 3, 2, 2), 0.5)
    factor = (augment(grey, [brightness_only], g, jitter_form="torchvision") / 0.5)[:, 0, 0, 0]
    assert factor.min() >= 0.6 - 1e-6 and factor.max() <= 1.4 + 1e-6 and factor.min() < 0.62


def test_colour_jitter_range_and_grey_invariance():
    g = torch.Generator().manual_seed(0)
    jitter = AugmentPreset(flip_p=0, jitter_p=1.0, gray_p=0, blur_p=0, solarize_p=0)
    x = torch.rand(64, 3, 8, 8, generator=g)
    for form in ("byol", "torchvision"):
        out = augment(x, [jitter], g, jitter_form=form)
        assert out.min() >= 0 and out.max() <= 1
        assert not torch.allclose(out, x)
    # Hue rotation about the grey axis: identity at 0, grey stays grey, a full turn is the identity.
    mats = _hue_matrices(torch.tensor([0.0, 0.3, 1.0]))
    torch.testing.assert_close(mats[0], torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(mats[2], torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(mats[1] @ torch.ones(3), torch.ones(3), atol=1e-5, rtol=0)
    hue_only = AugmentPreset(
        flip_p=0,
        jitter_p=1.0,
        brightness=0,
        contrast=0,
        saturation=0,
        hue=0.5,
        gray_p=0,
        blur_p=0,
        solarize_p=0,
    )
    grey_img = torch.rand(8, 1, 4, 4, generator=g).expand(-1, 3, -1, -1) * 0.5
    for form in ("byol", "torchvision"):
        torch.testing.assert_close(augment(grey_img, [hue_only], g, jitter_form=form), grey_img, atol=1e-5,
                                   rtol=0)


def test_blur():
    assert [blur_kernel_size(s) for s in (16, 32, 96, 224)] == [3, 3, 9, 23]
    g = torch.Generator().manual_seed(0)
    const = torch.full((4, 3, 16, 16), 0.3)
    torch.testing.assert_close(_gaussian_blur(const, torch.tensor([0.5, 1.0, 2.0, 0.0])), const)
    noise = torch.rand(4, 3, 32, 32, generator=g)
    out = _gaussian_blur(noise, torch.tensor([0.0, 0.5, 1.0, 2.0]))
    torch.testing.assert_close(out[0], noise[0])  # sigma 0: delta kernel
    stds = [out[i].std().item() for i in range(4)]
    assert stds[0] > stds[1] > stds[2] > stds[3]
    # sigma 1, kernel 3: matches torchvision's gaussian_blur (reflect padding) on one image.
    ref = TF.gaussian_blur(noise[2:3], kernel_size=[3, 3], sigma=[1.0, 1.0])
    torch.testing.assert_close(out[2:3], ref, atol=1e-5, rtol=0)


def test_center_view():
    imgs = _images(2, 32, 32)
    out = center_view(imgs, 32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(out, imgs.float() / 255 * 2 - 1)
    out = center_view(_images(2, 48, 64), 32)
    assert out.shape == (2, 3, 32, 32)
    out = center_view(_images(2, 256, 256), 224, crop_fraction=0.875)
    assert out.shape == (2, 3, 224, 224)


def test_make_views_normalises():
    images = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    cfg = _plain_cfg(large_size=8, small_size=4, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    views = make_views(images, cfg, torch.Generator().manual_seed(0))
    expected = torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1)
    assert all(torch.allclose(v, expected.expand_as(v)) for v in views.large + views.small)
    assert math.isclose(views.small[0].mean().item(), 1.5, rel_tol=1e-6)


@pytest.mark.parametrize("blur", [False, True])
def test_default_presets_run(blur):
    views = make_views(_images(8, 32, 32), ViewConfig(blur=blur), torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v).all() for v in views.large + views.small)
