"""Batched view generation: parameter ranges, independence, determinism, and agreement of each
primitive op with torchvision for fixed parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision.ops import roi_align

from sslrun.data.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    ViewGenerator,
    ViewRecipe,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_view,
    check_views_fit,
    color_jitter,
    gaussian_blur,
    normalize,
    resized_crop,
    sample_crop_boxes,
    sample_view_params,
    solarize,
    to_grayscale,
)
from sslrun.errors import SslrunError

CONF = Path(__file__).resolve().parents[2] / "conf" / "augmentation"
SIMCLR = {"count": 2, "jitter_p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1,
          "grayscale_p": 0.2}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """Float images in [0, 1] with structure at several scales (not pure noise)."""
    g = gen(seed)
    coarse = F.interpolate(torch.rand(n, c, 6, 6, generator=g), size=size, mode="bicubic", align_corners=False)
    return (0.8 * coarse + 0.2 * torch.rand(n, c, size, size, generator=g)).clamp(0, 1)


def box(left: int, top: int, w: int, h: int) -> torch.Tensor:
    return torch.tensor([[left, top, left + w, top + h]], dtype=torch.float32)


# ----------------------------------------------------------------------------- parameter sampling


def test_crop_boxes_lie_in_image_with_area_and_aspect_in_range():
    size = 400  # large, so rounding w and h to whole pixels moves area/aspect by < 1%
    boxes = sample_crop_boxes(20000, size, size, (0.08, 1.0), (3 / 4, 4 / 3), gen())
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert torch.equal(boxes, boxes.round())  # whole pixels, like torchvision
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= size and boxes[:, 3].max() <= size
    area = w * h / size**2
    assert area.min() >= 0.08 * 0.98 and area.max() <= 1.0
    assert (w / h).min() >= 0.75 * 0.99 and (w / h).max() <= 4 / 3 * 1.01
    assert area.min() < 0.09 and area.max() > 0.97  # the whole range is used


def test_crop_boxes_match_torchvision_distribution():
    n, size = 4000, 32
    ours = sample_crop_boxes(n, size, size, (0.08, 1.0), (3 / 4, 4 / 3), gen())
    ours = torch.stack([ours[:, 2] - ours[:, 0], ours[:, 3] - ours[:, 1], ours[:, 0]], 1)  # w, h, left
    rrc = T.RandomResizedCrop(size)
    img = torch.zeros(3, size, size)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tv = torch.tensor([[p["width"], p["height"], p["left"]] for p in (rrc.make_params([img]) for _ in range(n))])
    tv = tv.float()
    # Means differ by less than 4 standard errors (w, h std ~6 px; left ~5 px; area fraction ~0.28).
    assert (ours.mean(0) - tv.mean(0)).abs().max() < 0.5
    area, tv_area = ours[:, 0] * ours[:, 1] / size**2, tv[:, 0] * tv[:, 1] / size**2
    assert abs(area.mean() - tv_area.mean()) < 0.025


def test_crop_boxes_fallback_is_torchvision_central_crop():
    # Areas above the image's never fit, so every sample takes the fallback.
    boxes = sample_crop_boxes(5, 40, 100, (1.5, 2.0), (3 / 4, 4 / 3), gen())
    p = T.RandomResizedCrop(10, scale=(1.5, 2.0)).make_params([torch.zeros(3, 40, 100)])
    expected = box(p["left"], p["top"], p["width"], p["height"])
    assert torch.equal(boxes, expected.expand(5, 4))


def test_view_params_rates_and_ranges():
    recipe = ViewRecipe(**SIMCLR, blur_p=0.5, solarize_p=0.3, hflip=0.5)
    n = 20000
    p = sample_view_params(recipe, n, 32, 32, gen())
    for mask, rate in [(p.flip, 0.5), (p.jitter, 0.8), (p.gray, 0.2), (p.sigma > 0, 0.5), (p.solarize, 0.3)]:
        assert mask.dtype == torch.bool and abs(mask.float().mean().item() - rate) < 0.02
    jit = p.factors[p.jitter]
    for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]):
        assert lo <= jit[:, k].min() < lo + 0.01 and hi - 0.01 < jit[:, k].max() <= hi
    assert torch.equal(p.factors[~p.jitter], torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(n - len(jit), 4))
    blurred = p.sigma[p.sigma > 0]
    assert blurred.min() >= 0.1 and blurred.max() <= 2.0
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(n, 4))  # permutations
    first_op_rates = torch.bincount(p.order[:, 0], minlength=4).float() / n
    assert torch.allclose(first_op_rates, torch.full((4,), 0.25), atol=0.02)  # order drawn per sample


def test_params_independent_across_samples_and_draws():
    recipe = ViewRecipe(**SIMCLR)
    g = gen()
    a = sample_view_params(recipe, 256, 32, 32, g)
    b = sample_view_params(recipe, 256, 32, 32, g)
    assert len(torch.unique(a.boxes, dim=0)) > 200
    assert len(torch.unique(a.order, dim=0)) == 24  # all orders occur within one batch
    assert not torch.equal(a.boxes, b.boxes) and not torch.equal(a.factors, b.factors)


# ----------------------------------------------------------------------------- the module


def test_forward_shapes_dtypes_and_recipe_order():
    views = [{"count": 2, "size": 32}, {"count": 3, "size": 16, "scale": [0.05, 0.2]}]
    vg = ViewGenerator(views, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    out = vg(x, gen())
    assert vg.num_views == 5
    assert [tuple(v.shape) for v in out] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in out)


def test_one_channel_images_with_full_colour_recipe():
    vg = ViewGenerator([dict(SIMCLR, blur_p=0.5, solarize_p=0.5)], mean=[0.13], std=[0.31])
    out = vg(torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8), gen())
    assert [tuple(v.shape) for v in out] == [(16, 1, 28, 28)] * 2
    assert all(torch.isfinite(v).all() for v in out)


def test_views_differ_across_samples_and_views():
    one = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=gen(1))
    v1, v2 = ViewGenerator([SIMCLR], [0.5] * 3, [0.25] * 3)(one.expand(16, -1, -1, -1), gen())
    flat = v1.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(16) * 1e9).min() > 1.0  # no two samples alike
    assert (v1 - v2).abs().flatten(1).amax(1).min() > 0.1  # each sample's two views differ


def test_seeded_generator_is_deterministic():
    vg = ViewGenerator([dict(SIMCLR, blur_p=0.5, solarize_p=0.2)], [0.5] * 3, [0.25] * 3)
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=gen(1))
    a, b, c = vg(x, gen(7)), vg(x, gen(7)), vg(x, gen(8))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_identity_recipe_gives_normalized_input():
    x = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8, generator=gen())
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    vg = ViewGenerator([{"scale": [1, 1], "ratio": [1, 1], "hflip": 0.0}], mean, std)
    (view,) = vg(x, gen())
    expected = TF.normalize(x.float() / 255, mean, std)
    assert torch.allclose(view, expected, atol=1e-5) and torch.allclose(normalize(x, mean, std), expected, atol=1e-6)


def test_recipe_defaults_validation_and_derived_sizes():
    (view,) = ViewGenerator([{}], [0.5], [0.5])(torch.zeros(2, 1, 12, 12, dtype=torch.uint8))
    assert view.shape == (2, 1, 12, 12)  # an empty recipe: crop + flip at the input size
    with pytest.raises(SslrunError, match="blurr_p"):
        ViewRecipe.from_config({"blurr_p": 0.5})
    with pytest.raises(SslrunError, match="jitter_p"):
        ViewRecipe(jitter_p=1.5)
    with pytest.raises(SslrunError, match="hue"):
        ViewRecipe(hue=0.6)
    assert [ViewRecipe().kernel_size(s) for s in (32, 96, 224)] == [3, 9, 23]  # SimCLR: 23 at 224
    assert ViewRecipe(size=32).supersample(32, 32) == 1
    assert ViewRecipe(size=18, scale=(0.05, 0.14)).supersample(32, 32) == 1  # local crops are upscaled
    assert ViewRecipe(size=224).supersample(256, 256) == 2


@pytest.mark.parametrize("key,value", [("scale", (1.5, 2.0)), ("scale", (0.5, 1.2)), ("scale", (0.9, 0.2)),
                                       ("scale", (0.0, 1.0)), ("ratio", (-1.0, 1.0)), ("ratio", (2.0, 0.5))])
def test_crop_scale_and_ratio_outside_their_ranges_are_refused(key, value):
    # scale is a fraction of the image area: above 1 torchvision's sampler never fits and silently falls back
    # to the central crop of the whole image, so [1.5, 2] used to train on uncropped images.
    with pytest.raises(SslrunError, match=f"{key}="):
        ViewRecipe(**{key: value})
    ViewRecipe(scale=(0.08, 1.0), ratio=(0.75, 4 / 3))  # the usual values pass


def test_view_sizes_larger_than_the_images_warn_in_one_line(caplog):
    views = OmegaConf.create([{"count": 2, "size": 32}, {"count": 6, "size": 18}, {"count": 0, "size": 99}])
    with caplog.at_level("WARNING", logger="sslrun.data.augment"):
        check_views_fit(views, 32)
    assert caplog.records == []  # equal and smaller sizes, and a recipe with no views, are fine
    views[1].size = 64
    with caplog.at_level("WARNING", logger="sslrun.data.augment"):
        check_views_fit(views, 32)
    (record,) = caplog.records
    assert "augmentation.views.1.size=64 is larger than the 32-px images" in record.getMessage()
    assert "\n" not in record.getMessage()
    with pytest.raises(SslrunError, match="scale"):
        check_views_fit([{"scale": [1.5, 2]}], 32)


@pytest.mark.parametrize("name", ["simclr", "byol", "minimal", "multicrop"])
@pytest.mark.parametrize("image_size,channels", [(32, 3), (28, 1)])
def test_config_composes_and_instantiates(name, image_size, channels):
    cfg = OmegaConf.create({"dataset": {"image_size": image_size, "channels": channels}})
    cfg.augmentation = OmegaConf.load(CONF / f"{name}.yaml")
    vg = instantiate(cfg.augmentation, mean=[0.5] * channels, std=[0.25] * channels)
    assert isinstance(vg, ViewGenerator)
    out = vg(torch.randint(0, 256, (4, channels, image_size, image_size), dtype=torch.uint8), gen())
    sizes = [v.shape[-1] for v in out]
    expected = {"byol": [image_size] * 2, "multicrop": [image_size] * 2 + [18] * 6}
    assert sizes == expected.get(name, [image_size] * 2)
    assert all(v.shape[:2] == (4, channels) for v in out)


# ----------------------------------------------------------------------------- primitives vs torchvision


def test_resized_crop_upscaling_whole_image_matches_torchvision():
    img = smooth_images(1, 3, 16)
    ours = resized_crop(img, box(0, 0, 16, 16), 24)
    assert torch.allclose(ours, TF.resize(img, [24, 24], antialias=True), atol=1e-5)


def test_resized_crop_upscaling_interior_crop_matches_torchvision_inside_border():
    img = smooth_images(1, 3, 32)
    top, left, h, w, size = 3, 5, 12, 10, 24
    ours = resized_crop(img, box(left, top, w, h), size)
    tv = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    # Taps within half a pixel of the crop edge: torchvision clamps to the crop's edge pixel, we
    # interpolate with the image pixel just outside the crop. Everywhere else: same bilinear taps.
    centres = (torch.arange(size) + 0.5) / size
    rows = ((centres * h - 0.5 >= 0) & (centres * h - 0.5 <= h - 1)).nonzero().squeeze(1)
    cols = ((centres * w - 0.5 >= 0) & (centres * w - 0.5 <= w - 1)).nonzero().squeeze(1)
    assert len(rows) >= size - 2 and len(cols) >= size - 2
    inner = (slice(None), slice(None), rows[:, None], cols[None, :])
    assert torch.allclose(ours[inner], tv[inner], atol=1e-5)
    assert (ours - tv).abs().max() < 0.1


def test_resized_crop_downscaling_antialias_close_to_torchvision():
    # Supersampling is a box filter; torchvision's antialias is a triangle filter: close, not equal.
    img = smooth_images(1, 3, 64)
    top, left, h, w, size = 4, 8, 48, 48, 12
    tv = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    antialiased = resized_crop(img, box(left, top, w, h), size, supersample=4)
    aliased = resized_crop(img, box(left, top, w, h), size)
    assert (antialiased - tv).abs().mean() < 0.015
    assert (antialiased - tv).abs().mean() < 0.6 * (aliased - tv).abs().mean()
    # Same taps as roi_align with sampling_ratio = supersample.
    rois = torch.cat([torch.zeros(1, 1), box(left, top, w, h)], 1)
    assert torch.allclose(antialiased, roi_align(img, rois, size, 1.0, 4, aligned=True), atol=1e-5)


def test_resized_crop_flip_is_hflip():
    img = smooth_images(2, 3, 32)
    boxes = torch.cat([box(3, 2, 20, 25), box(0, 5, 30, 17)])
    plain = resized_crop(img, boxes, 16)
    flipped = resized_crop(img, boxes, 16, flip=torch.tensor([True, False]))
    assert torch.allclose(flipped[0], TF.horizontal_flip(plain[0]), atol=1e-5)
    assert torch.equal(flipped[1], plain[1])


@pytest.mark.parametrize(
    "ours,theirs,lo,hi",
    [
        (adjust_brightness, TF.adjust_brightness, 0.0, 2.0),
        (adjust_contrast, TF.adjust_contrast, 0.0, 2.0),
        (adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
        (adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
@pytest.mark.parametrize("channels", [3, 1])
def test_colour_ops_match_torchvision_per_sample(ours, theirs, lo, hi, channels):
    imgs = smooth_images(6, channels, 16)
    factors = torch.linspace(lo, hi, 6)
    out = ours(imgs, factors)
    for i in range(6):
        assert torch.allclose(out[i], theirs(imgs[i], factors[i].item()), atol=1e-5), (ours.__name__, i)


def test_hue_handles_grey_and_saturated_pixels():
    pixels = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.2, 0.7, 0.7]])
    img = pixels.T.reshape(1, 3, 1, 5).expand(4, -1, -1, -1)
    factors = torch.tensor([-0.5, -0.2, 0.3, 0.5])
    out = adjust_hue(img, factors)
    for i in range(4):
        assert torch.allclose(out[i], TF.adjust_hue(img[i], factors[i].item()), atol=1e-5)


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_follows_each_samples_order_like_torchvision(channels):
    imgs = smooth_images(24, channels, 12)
    g = gen(3)
    order = torch.rand(24, 4, generator=g).argsort(1)
    b, c, s = (0.5 + torch.rand(24, generator=g) for _ in range(3))
    h = torch.rand(24, generator=g) * 0.4 - 0.2
    tv_ops = {BRIGHTNESS: (TF.adjust_brightness, b), CONTRAST: (TF.adjust_contrast, c),
              SATURATION: (TF.adjust_saturation, s), HUE: (TF.adjust_hue, h)}

    def torchvision_in_order(i: int, skip: int | None = None) -> torch.Tensor:
        img = imgs[i]
        for op in order[i].tolist():
            fn, factors = tv_ops[op]
            img = img if op == skip else fn(img, factors[i].item())
        return img

    out = color_jitter(imgs, b, c, s, h, order)
    # A disabled op (None) is skipped; the others keep each sample's order.
    no_contrast = color_jitter(imgs, b, None, s, h, order)
    for i in range(24):
        assert torch.allclose(out[i], torchvision_in_order(i), atol=1e-5), i
        assert torch.allclose(no_contrast[i], torchvision_in_order(i, skip=CONTRAST), atol=1e-5), i


def test_grayscale_solarize_and_blur_match_torchvision():
    imgs = smooth_images(3, 3, 20)
    assert torch.allclose(to_grayscale(imgs), TF.rgb_to_grayscale(imgs, num_output_channels=3), atol=1e-6)
    assert torch.equal(solarize(imgs), TF.solarize(imgs, 0.5))
    sigma = torch.tensor([0.3, 1.0, 2.0])
    blurred = gaussian_blur(imgs, sigma, 7)
    for i in range(3):
        expected = TF.gaussian_blur(imgs[i], [7, 7], [sigma[i].item()] * 2)
        assert torch.allclose(blurred[i], expected, atol=1e-5)
    assert torch.allclose(gaussian_blur(imgs, torch.zeros(3), 7), imgs)  # sigma 0: unchanged
    gray = smooth_images(2, 1, 20)
    assert torch.equal(to_grayscale(gray), gray)
    expected = TF.gaussian_blur(gray[0], [5, 5], [1.5, 1.5])
    assert torch.allclose(gaussian_blur(gray, torch.tensor([1.5, 1.5]), 5)[0], expected, atol=1e-5)



def test_forward_equals_one_pass_over_drawn_params():
    # forward chunks the batch on CPU; the result must not depend on it.
    recipe = dict(SIMCLR, blur_p=0.5, solarize_p=0.2)
    x = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=gen(1))
    views = ViewGenerator([recipe], [0.5] * 3, [0.25] * 3)(x, gen())
    params = sample_view_params(ViewRecipe(**recipe), 200, 32, 32, gen())
    expected = (apply_view(x.float().div(255).repeat(2, 1, 1, 1), ViewRecipe(**recipe), params) - 0.5) / 0.25
    assert torch.allclose(torch.cat(views), expected, atol=1e-5)
