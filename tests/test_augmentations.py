"""Batched per-sample augmentations against a per-sample torchvision reference (METHOD.md §2)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as F
from helpers import requires_cuda
from torchvision.transforms import InterpolationMode

from sensitivity.augmentations import (
    AUGMENTATION_SETS,
    AUGMENTATIONS,
    apply,
    gaussian_blur_kernel_size,
    local_blur_kernel_size,
    minmax_rescale,
    validate,
)

SIZES = [(64, 64), (224, 224), (48, 80)]  # the last one checks that H and W are not mixed up
COPIES = 4  # copies of each of the 2 photos: B = 8, each copy with its own parameters

# float32 round-off of reordered but equivalent arithmetic stays below 1e-6; 1e-5 leaves margin
EXACT_ATOL = 1e-5
# rotation: our grid is torchvision's, but computed with broadcast multiply-adds where
# torchvision calls bmm (which may fuse them), so a normalised grid coordinate can differ in
# its last float32 bit: 1 ulp of ~1 is 1.3e-5 px at 224 px, moving a bilinear pixel by up to
# 1.3e-5 x (local contrast <= 1). Measured max 8.4e-6; 5e-5 leaves margin for larger images.
ROTATION_ATOL = 5e-5
# elliptic blur: pixels whose ellipse level (u/a)^2 + (v/b)^2 is within this of 1 may fall on
# either side in float32 vs the float64 reference; every other pixel must match to EXACT_ATOL.
ELLIPSE_BAND = 1e-5
MEAN_ATOL = 1e-3


def torchvision_reference(name: str, image: torch.Tensor, params: dict[str, float]) -> torch.Tensor:
    """METHOD.md §2 for one (3, H, W) image and scalar parameters, via torchvision v2 F."""
    height, width = image.shape[-2:]
    if name == "erasing":
        ratio = math.exp(params["log_ratio"])
        area = height * width * params["scale"]
        h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        top = math.floor(params["center_y"] - h / 2 + 0.5)
        left = math.floor(params["center_x"] - w / 2 + 0.5)
        i, j = max(top, 0), max(left, 0)
        return F.erase(
            image, i, j, min(top + h, height) - i, min(left + w, width) - j, torch.tensor(0.0)
        )
    if name == "sharpness":
        return F.adjust_sharpness(image, 1.5)
    if name == "rolling":
        return torch.roll(image, (int(params["shift_y"]), int(params["shift_x"])), dims=(-2, -1))
    if name == "grayscale":
        return F.rgb_to_grayscale(image, num_output_channels=3)
    if name == "gaussian_blur":
        k = max(3, 2 * round(3 * min(height, width) / 224) + 1)
        return F.gaussian_blur(image, [k, k], [params["sigma"]] * 2)
    if name == "brightness":
        return F.adjust_brightness(image, params["factor"])
    if name == "contrast":
        return F.adjust_contrast(image, params["factor"])
    if name == "saturation":
        return F.adjust_saturation(image, params["factor"])
    if name == "hue":
        return F.adjust_hue(image, params["factor"])
    if name == "hflip":
        return F.horizontal_flip(image)
    if name == "rotation":
        angle = math.radians(params["angle"])
        zoom = abs(math.cos(angle)) + max(height / width, width / height) * abs(math.sin(angle))
        return F.affine(
            image,
            angle=params["angle"],
            translate=[0.0, 0.0],
            scale=zoom,
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
        )
    if name == "elliptic_local_blur":
        sigma = 3.0 * min(height, width) / 224
        k = 2 * math.ceil(3 * sigma) + 1
        blurred = F.gaussian_blur(image, [k, k], [sigma, sigma])
        return torch.where(ellipse_level(height, width, params) <= 1.0, blurred, image)
    raise AssertionError(name)


def ellipse_level(height: int, width: int, params: dict[str, float]) -> torch.Tensor:
    """(u/a)^2 + (v/b)^2 per pixel in float64, (H, W): <= 1 inside the ellipse."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    dx = xs - ((width - 1) / 2 + params["shift_x"])
    dy = ys - ((height - 1) / 2 + params["shift_y"])
    t = math.radians(params["angle"])
    u = dx * math.cos(t) - dy * math.sin(t)
    v = dx * math.sin(t) + dy * math.cos(t)
    return (u / params["a"]) ** 2 + (v / params["b"]) ** 2


def draw_params(
    name: str, batch: int, height: int, width: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Uniform per-sample parameters over the bounds at this size; samples 0 and 1 sit on them."""
    generator = torch.Generator().manual_seed(seed)
    spec = AUGMENTATIONS[name]
    params = {}
    for pspec, (low, high) in zip(spec.params, spec.bounds(height, width), strict=True):
        if pspec.integer:
            value = torch.randint(int(low), int(high) + 1, (batch,), generator=generator).double()
        else:
            value = low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)
        value[0], value[1] = low, high
        params[pspec.name] = value.float()
    return params


def photo_batch(photos: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(2 * COPIES, 3, height, width) float32 in [0, 1] from the sample photographs."""
    resized = F.resize(photos, [height, width], antialias=True).clamp(0.0, 1.0)
    return resized.repeat_interleave(COPIES, dim=0).contiguous()


def sample_params(params: dict[str, torch.Tensor], index: int) -> dict[str, float]:
    return {key: float(value[index]) for key, value in params.items()}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_matches_per_sample_torchvision(sample_photos, name, size):
    images = photo_batch(sample_photos, *size)
    original = images.clone()
    params = draw_params(name, images.shape[0], *size)
    out = apply(name, images, params)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.equal(images, original), "apply must not modify its input"
    for index in range(images.shape[0]):
        scalars = sample_params(params, index)
        expected = torchvision_reference(name, images[index], scalars)
        diff = (out[index] - expected).abs()
        context = f"{name} sample {index} params {scalars}"
        assert diff.mean() <= MEAN_ATOL, context
        if name == "rotation":
            assert diff.max() <= ROTATION_ATOL, f"{context}: max {diff.max():.3g}"
        elif name == "elliptic_local_blur":
            off_band = (ellipse_level(*size, scalars) - 1.0).abs() > ELLIPSE_BAND
            worst = diff.amax(dim=0)[off_band].max()
            assert worst <= EXACT_ATOL, f"{context}: max {worst:.3g} off the boundary"
        else:
            assert diff.max() <= EXACT_ATOL, f"{context}: max {diff.max():.3g}"


def test_augmentations_change_the_image(sample_photos):
    """Guards against a reference and an implementation that both do nothing."""
    images = photo_batch(sample_photos, 64, 64)
    for name in AUGMENTATIONS:
        params = draw_params(name, images.shape[0], 64, 64, seed=1)
        changed = (apply(name, images, params) - images).abs().amax(dim=(1, 2, 3))
        # sample 1 sits on the upper bounds, the strongest setting of every augmentation
        assert changed[1] > 0.05, name


@pytest.mark.parametrize("name", [n for n, s in AUGMENTATIONS.items() if s.identity is not None])
def test_identity_parameters_return_the_input(sample_photos, name):
    images = photo_batch(sample_photos, 64, 64)
    batch = images.shape[0]
    identity = AUGMENTATIONS[name].identity
    params = {key: torch.full((batch,), value) for key, value in identity.items()}
    # rotation by 0 still resamples through grid_sample and hue by 0 still goes through HSV:
    # both round-trip within float32 round-off, not bit-exactly (torchvision's neither)
    atol = {"rotation": 1e-5, "hue": 1e-6}.get(name, 0.0)
    torch.testing.assert_close(apply(name, images, params), images, atol=atol, rtol=0.0)


def test_identity_specs_are_those_of_method():
    with_identity = {n: s.identity for n, s in AUGMENTATIONS.items() if s.identity is not None}
    assert with_identity == {
        "rolling": {"shift_y": 0.0, "shift_x": 0.0},
        "brightness": {"factor": 1.0},
        "contrast": {"factor": 1.0},
        "saturation": {"factor": 1.0},
        "hue": {"factor": 0.0},
        "rotation": {"angle": 0.0},
    }
    assert AUGMENTATION_SETS[1] + AUGMENTATION_SETS[2] == list(AUGMENTATIONS)


def test_spatial_bounds_scale_with_image_size():
    assert AUGMENTATIONS["erasing"].bounds(112, 112)[:2] == [(22.0, 90.0), (22.0, 90.0)]
    assert (
        AUGMENTATIONS["erasing"].bounds(112, 448)[2:]
        == AUGMENTATIONS["erasing"].bounds(224, 224)[2:]
    )
    # integers are rounded: 44 * 64 / 224 = 12.57 -> 13
    assert AUGMENTATIONS["rolling"].bounds(64, 128) == [(-13.0, 13.0), (-25.0, 25.0)]
    low, high = AUGMENTATIONS["gaussian_blur"].bounds(64, 128)[0]
    assert low == pytest.approx(0.1 * 64 / 224) and high == pytest.approx(2.0 * 64 / 224)
    assert AUGMENTATIONS["elliptic_local_blur"].bounds(448, 448)[0] == (20.0, 64.0)
    assert AUGMENTATIONS["rotation"].bounds(64, 64) == [(-10.0, 10.0)]
    assert [gaussian_blur_kernel_size(s, s) for s in (32, 64, 224, 512)] == [3, 3, 7, 15]
    assert local_blur_kernel_size(224, 224) == 19 and local_blur_kernel_size(64, 64) == 7

    images = torch.rand(2, 3, 64, 64)
    apply("rolling", images, {"shift_y": torch.tensor([-13.0, 13.0]), "shift_x": torch.zeros(2)})
    with pytest.raises(ValueError, match="outside its bounds"):  # 224-px bound at 64 px
        apply("rolling", images, {"shift_y": torch.tensor([44.0, 0.0]), "shift_x": torch.zeros(2)})


def _good(name: str, batch: int = 2, size: int = 64) -> tuple[torch.Tensor, dict]:
    return torch.rand(batch, 3, size, size), draw_params(name, batch, size, size)


def _bad_cases():
    images, blur = _good("gaussian_blur")
    _, roll = _good("rolling")
    yield "unknown name", "blurr", images, blur, "valid names: erasing"
    yield "3-D images", "gaussian_blur", images[0], blur, r"\(B, 3, H, W\)"
    yield "4 channels", "gaussian_blur", torch.rand(2, 4, 64, 64), blur, r"\(B, 3, H, W\)"
    yield "uint8", "hflip", (images * 255).to(torch.uint8), {}, "floating point"
    yield "above 1", "gaussian_blur", images * 2.0, blur, r"\[0, 1\]"
    yield "below 0", "hflip", images - 0.5, None, r"\[0, 1\]"
    yield "missing", "rolling", images, {"shift_y": roll["shift_y"]}, r"missing \['shift_x'\]"
    yield "extra", "hflip", images, {"factor": torch.ones(2)}, r"extra \['factor'\]"
    yield "wrong name", "brightness", images, {"sigma": torch.ones(2)}, "missing"
    yield "scalar", "gaussian_blur", images, {"sigma": torch.tensor(0.2)}, r"shape \(2,\)"
    yield "(B, 1)", "gaussian_blur", images, {"sigma": blur["sigma"][:, None]}, r"shape \(2,\)"
    yield "wrong B", "gaussian_blur", images, {"sigma": torch.full((3,), 0.2)}, r"shape \(2,\)"
    yield "list", "gaussian_blur", images, {"sigma": [0.2, 0.2]}, r"shape \(2,\)"
    nan = torch.tensor([0.2, float("nan")])
    yield "nan", "gaussian_blur", images, {"sigma": nan}, "non-finite"
    inf = torch.tensor([0.2, float("inf")])
    yield "inf", "gaussian_blur", images, {"sigma": inf}, "non-finite"
    yield "high", "gaussian_blur", images, {"sigma": torch.tensor([0.2, 2.0])}, "outside its"
    yield "low", "hue", images, {"factor": torch.tensor([-0.6, 0.0])}, "outside its bounds"
    half = {"shift_y": torch.tensor([1.5, 0.0]), "shift_x": torch.zeros(2)}
    yield "fractional shift", "rolling", images, half, "integral"
    yield "params not dict", "hue", images, [torch.zeros(2)], "dict"
    yield "tiny image", "hflip", torch.rand(2, 3, 2, 64), {}, "at least 3 x 3"


@pytest.mark.parametrize(
    ("name", "images", "params", "match"),
    [case[1:] for case in _bad_cases()],
    ids=[case[0] for case in _bad_cases()],
)
def test_bad_input_raises_value_error(name, images, params, match):
    with pytest.raises(ValueError, match=match):
        apply(name, images, params)


def test_validate_checks_several_augmentations_in_one_call(sample_photos):
    images = photo_batch(sample_photos, 48, 80)
    params = {name: draw_params(name, images.shape[0], 48, 80) for name in AUGMENTATIONS}
    values = validate(images, params)
    assert set(values) == set(AUGMENTATIONS)
    for name, spec in AUGMENTATIONS.items():
        assert list(values[name]) == list(spec.param_names)
        assert all(v.dtype == torch.float64 for v in values[name].values())
        # what a pipeline does after one validate: skip the per-call checks, same result
        assert torch.equal(
            apply(name, images, values[name], validated=True), apply(name, images, params[name])
        )
    bad = dict(params, erasing=draw_params("erasing", images.shape[0], 224, 224))
    with pytest.raises(ValueError, match=r"erasing: parameter 'center_(x|y)'.*outside its bounds"):
        validate(images, bad)
    with pytest.raises(ValueError, match="hue, rotation: image values must lie in"):
        validate(images * 2, {"hue": params["hue"], "rotation": params["rotation"]})
    with pytest.raises(ValueError, match="unknown augmentation 'blur'"):
        validate(images, {"blur": {}})


def test_parameterless_augmentations_accept_none_and_empty_dict():
    images = torch.rand(3, 3, 32, 32)
    for name in ("sharpness", "grayscale", "hflip"):
        assert torch.equal(apply(name, images, None), apply(name, images, {}))


def test_empty_batch():
    out = apply("rotation", torch.rand(0, 3, 32, 32), {"angle": torch.zeros(0)})
    assert out.shape == (0, 3, 32, 32)


def test_bfloat16_is_float32_rounded_once(sample_photos):
    """Half inputs compute in float32: the result is the float32 result of the rounded input,
    rounded once more (half an ulp below 1 is 2^-9)."""
    images = photo_batch(sample_photos, 64, 64).to(torch.bfloat16)
    for name in AUGMENTATIONS:
        params = draw_params(name, images.shape[0], 64, 64, seed=2)
        out = apply(name, images, params)
        assert out.dtype == torch.bfloat16, name
        reference = apply(name, images.float(), params)
        torch.testing.assert_close(out.float(), reference, atol=2.0**-9, rtol=0.0, msg=name)


def test_minmax_rescale_per_image_and_channel():
    generator = torch.Generator().manual_seed(0)
    images = 0.2 + 0.5 * torch.rand(4, 3, 16, 16, generator=generator)
    images[1, 2] = 0.3  # a constant plane is only shifted to 0, as in the reference
    out = minmax_rescale(images)
    low, high = out.flatten(2).aminmax(dim=-1)
    assert torch.all(low == 0.0)
    expected_high = torch.ones(4, 3)
    expected_high[1, 2] = 0.0
    torch.testing.assert_close(high, expected_high)
    plane = images[2, 0]
    torch.testing.assert_close(out[2, 0], (plane - plane.min()) / (plane.max() - plane.min()))


@requires_cuda
def test_cuda_matches_cpu(sample_photos):
    images = photo_batch(sample_photos, 224, 224)
    for name in AUGMENTATIONS:
        params = draw_params(name, images.shape[0], 224, 224, seed=3)
        cpu = apply(name, images, params)
        cuda_params = {key: value.cuda() for key, value in params.items()}
        gpu = apply(name, images.cuda(), cuda_params)
        assert gpu.device.type == "cuda"
        diff = (gpu.cpu() - cpu).abs()
        assert diff.mean() <= 1e-6, name
        if name == "elliptic_local_blur":
            # float32 ellipse levels may round differently on the two devices at the rim
            assert (diff > EXACT_ATOL).float().mean() <= 1e-3, name
        else:
            atol = ROTATION_ATOL if name == "rotation" else EXACT_ATOL
            assert diff.max() <= atol, f"{name}: max {diff.max():.3g}"
