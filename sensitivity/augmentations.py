"""The 12 augmentations of METHOD.md section 2 as batched, per-sample torch operations.

``apply(name, images, params)`` takes images ``(B, 3, H, W)`` float in [0, 1] and per-sample
parameters ``dict[str, Tensor[B]]`` in natural units *at this image size*, and returns
``(B, 3, H, W)``; for the built-ins each sample matches torchvision.transforms.v2.functional
applied to it alone (tests/test_augmentations.py). Every kernel here registers itself with
``register_augmentation`` (its parameters, bounds at 224 px and identity values), as a user's
augmentation does (``sensitivity.registry``, re-exported here with the specs of
``sensitivity.augmentation_specs``: ``AUGMENTATIONS``, ``validate``); ``apply`` runs any
registered augmentation. ``minmax_rescale`` is the reference's optional per-image, per-channel
post-processing.
"""

from __future__ import annotations

import math

import torch

from sensitivity.augmentation_specs import (
    AUGMENTATION_SETS,
    AUGMENTATIONS,
    REFERENCE_SIDE,
    AugmentationSpec,
    ParamSpec,
    augmentation_spec,
    validate,
)
from sensitivity.registry import (
    check_augmentation,
    import_augmentation,
    register_augmentation,
    unregister_augmentation,
)

__all__ = [
    "AUGMENTATIONS",
    "AUGMENTATION_SETS",
    "REFERENCE_SIDE",
    "AugmentationSpec",
    "ParamSpec",
    "apply",
    "check_augmentation",
    "gaussian_blur_kernel_size",
    "import_augmentation",
    "local_blur_kernel_size",
    "local_blur_sigma",
    "minmax_rescale",
    "register_augmentation",
    "rotation_zoom",
    "unregister_augmentation",
    "validate",
]

GAUSSIAN_BLUR_HALF_WIDTH = 3
"""Half-width of the ``gaussian_blur`` kernel at 224 px (kernel 7), scaled with the smaller side."""

LOCAL_BLUR_SIGMA = 3.0
"""Sigma of the ``elliptic_local_blur`` blur at 224 px, scaled with the smaller side."""

SHARPNESS_FACTOR = 1.5
"""The fixed ``sharpness`` factor (METHOD.md section 2)."""

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def gaussian_blur_kernel_size(height: int, width: int) -> int:
    """Kernel size of ``gaussian_blur``: ``2 * round(3 * min(H, W) / 224) + 1``, at least 3.

    Args:
        height, width: image size in px.

    Returns:
        The odd kernel side in px: 7 at 224 px, 3 at 64 px, 15 at 512 px.
    """
    half = round(GAUSSIAN_BLUR_HALF_WIDTH * min(height, width) / REFERENCE_SIDE)
    return max(3, 2 * half + 1)


def local_blur_sigma(height: int, width: int) -> float:
    """Sigma of the ``elliptic_local_blur`` blur: ``3 * min(H, W) / 224``.

    Args:
        height, width: image size in px.

    Returns:
        Sigma in px.
    """
    return LOCAL_BLUR_SIGMA * min(height, width) / REFERENCE_SIDE


def local_blur_kernel_size(height: int, width: int) -> int:
    """Kernel size of the ``elliptic_local_blur`` blur: ``2 * ceil(3 * sigma) + 1``.

    Args:
        height, width: image size in px.

    Returns:
        The odd kernel side in px, 19 at 224 px.
    """
    return 2 * math.ceil(3 * local_blur_sigma(height, width)) + 1


def rotation_zoom(angle: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Smallest zoom that leaves no empty corner after rotating by ``angle``.

    ``|cos a| + max(H/W, W/H) * |sin a|``, which is METHOD.md's ``|cos a| + |sin a|`` for square
    images and stays border-free for rectangular ones.

    Args:
        angle: (B,) degrees.
        height, width: image size in px.

    Returns:
        (B,) zoom factors >= 1.
    """
    radians = torch.deg2rad(angle)
    aspect = max(height / width, width / height)
    return radians.cos().abs() + aspect * radians.sin().abs()


def apply(
    name: str,
    images: torch.Tensor,
    params: dict[str, torch.Tensor] | None = None,
    *,
    validated: bool = False,
) -> torch.Tensor:
    """Apply augmentation ``name`` to every image of a batch with its own parameters.

    Args:
        name: a key of ``AUGMENTATIONS`` (built-in or registered).
        images: (B, 3, H, W) float in [0, 1] (float32, float64, bfloat16 or float16), on CPU
            or CUDA; the built-ins transform the batch by whole-tensor ops, never a loop over
            samples.
        params: parameter name -> Tensor (B,) in natural units at this image size (pixels,
            degrees, factors; see ``AUGMENTATIONS[name].bounds(H, W)``). ``None`` or ``{}`` for
            sharpness, grayscale and hflip.
        validated: the caller has checked ``images`` (or the batch they were taken from) and
            ``params`` with ``validate``; skips the checks, which cost a pass over the images
            and a device synchronisation per call (what a pipeline of calls should pay once).

    Returns:
        (B, 3, H, W) new tensor of the input dtype and device. For half-precision inputs
        (bfloat16, float16) the arithmetic augmentations compute in float32 and round once at
        the end; erasing, rolling and hflip (``moves_data``) only move or zero values and stay
        in the input dtype. The built-ins use no convolution or matmul, so CUDA TF32 settings
        do not change their results.

    Raises:
        ValueError: unknown name, images not (B, 3, H, W) floating point in [0, 1], missing or
            extra parameters, parameters not (B,), non-finite, out of bounds or non-integral
            where the spec says integer.
    """
    spec = augmentation_spec(name)
    if validated:
        # float64 as ``validate`` returns them: rounding of pixel extents depends on it
        values = {p: (params or {})[p].to(images.device, torch.float64) for p in spec.param_names}
    else:
        values = validate(images, {name: params})[name]
    if images.shape[0] == 0:
        return images.clone()
    work = images if spec.moves_data else images.to(_compute_dtype(images.dtype))
    return spec.fn(work, values).to(images.dtype)


def minmax_rescale(images: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rescale every image and channel to span [0, 1] (the reference's ``postprocess: minmax``).

    ``(x - min) / (max - min)`` over each (H, W) plane; a plane whose range is below ``eps``
    is only shifted to 0, as the reference did.

    Args:
        images: (B, C, H, W) float.
        eps: smallest range that is rescaled, in image units.

    Returns:
        (B, C, H, W), a new tensor.

    Raises:
        ValueError: ``images`` is not 4-D.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    flat = images.flatten(2)
    low, high = flat.aminmax(dim=-1, keepdim=True)
    span = high - low
    span = torch.where(span < eps, torch.ones_like(span), span)
    return ((flat - low) / span).view_as(images)


# ----------------------------------------------------------------------------- helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision (per-sample factors and kernels would round to 8 bits)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _per_sample(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in ``dtype`` for broadcasting over images."""
    return value.to(dtype).view(-1, 1, 1, 1)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """torchvision's luma: (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = images.unbind(dim=1)
    wr, wg, wb = _GRAY_WEIGHTS
    return r.mul(wr).add_(g, alpha=wg).add_(b, alpha=wb).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with a per-sample ratio (B, 1, 1, 1): clamp(f*x + (1-f)*o)."""
    return (images * factor).addcmul_(other, 1.0 - factor).clamp_(0.0, 1.0)


def _gaussian_weights(size: int, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision's 1-D Gaussian kernel for each sigma: sigma (B,) -> (B, size), rows sum to 1."""
    lim = (size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=size, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax((x / sigma[:, None]).pow(2).neg(), dim=-1)


def _separable_blur(padded: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Blur a padded batch with a symmetric 1-D kernel along y, then x ('valid' extent).

    padded (B, C, h + k - 1, w + k - 1) -> (B, C, h, w); weights (B, k) one kernel per sample,
    or (1, k) shared. Equals torchvision's 2-D conv with the outer-product kernel. Shifted
    views need no per-sample loop and beat depthwise convolutions on CPU (PERFORMANCE.md
    "Augmentations"); the kernel's symmetry halves the multiplies.
    """
    size = weights.shape[-1]
    half = size // 2
    w = weights[:, None, :, None, None]  # (B or 1, 1, k, 1, 1) broadcasts over (B, C, h, w)

    def one_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
        extent = x.shape[dim] - 2 * half
        out = x.narrow(dim, half, extent) * w[:, :, half]
        pair = torch.empty_like(out)  # reused: fresh large tensors cost page faults on CPU
        for tap in range(half):
            torch.add(x.narrow(dim, tap, extent), x.narrow(dim, size - 1 - tap, extent), out=pair)
            out.addcmul_(pair, w[:, :, tap])
        return out

    return one_axis(one_axis(padded, 2), 3)


def _pixel_grid(length: int, device: torch.device) -> torch.Tensor:
    """Pixel indices 0..length-1 as float64 (exact comparisons with float64 extents)."""
    return torch.arange(length, device=device, dtype=torch.float64)


# ----------------------------------------------------------------------------- kernels
# Registered in this order, the order of AUGMENTATION_SETS 1 then 2. ``check=False``: the
# exactness tests against torchvision (tests/test_augmentations.py) check them more strictly.


@register_augmentation(
    "erasing",
    params=(
        ParamSpec("center_y", 44.0, 180.0, axis="y"),
        ParamSpec("center_x", 44.0, 180.0, axis="x"),
        ParamSpec("scale", 0.02, 0.33),
        ParamSpec("log_ratio", math.log(0.3), math.log(3.3)),
    ),
    moves_data=True,
    check=False,
)
def _erasing(images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Zero a rectangle per sample.

    h = round(sqrt(H*W*scale*r)), w = round(sqrt(H*W*scale/r)), r = exp(log_ratio) (round half
    to even, as Python's round); top = floor(center_y - h/2 + 0.5), left likewise (half up), so
    an odd side centred on a pixel covers it symmetrically. Rows [top, top+h) and columns
    [left, left+w) are zeroed after clipping to the image: F.erase(img, max(top, 0),
    max(left, 0), h', w', v=0) with h', w' the clipped extents.
    """
    _, _, height, width = images.shape
    ratio = p["log_ratio"].exp()
    area = height * width * p["scale"]
    h = (area * ratio).sqrt().round()
    w = (area / ratio).sqrt().round()
    top = torch.floor(p["center_y"] - h / 2 + 0.5)
    left = torch.floor(p["center_x"] - w / 2 + 0.5)
    ys, xs = _pixel_grid(height, images.device), _pixel_grid(width, images.device)
    rows = (ys >= top[:, None]) & (ys < (top + h)[:, None])
    cols = (xs >= left[:, None]) & (xs < (left + w)[:, None])
    mask = rows[:, None, :, None] & cols[:, None, None, :]
    return images.masked_fill(mask, 0.0)


@register_augmentation("sharpness", check=False)
def _sharpness(images: torch.Tensor, _: dict[str, torch.Tensor]) -> torch.Tensor:
    """F.adjust_sharpness(img, 1.5): blend with the 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13.

    With f = 1.5 and box the 3x3 sum, f*x + (1-f)*(box + 4x)/13 is
    (f + 4(1-f)/13) * x + (1-f)/13 * box, accumulated in place from shifted views (one extra
    full-size buffer: fresh large tensors cost page faults on CPU). Border pixels stay
    unchanged as in torchvision.
    """
    height, width = images.shape[-2:]
    rows = images[..., :-2, :] + images[..., 1:-1, :]
    rows.add_(images[..., 2:, :])
    output = images.clone()
    inner = output[..., 1 : height - 1, 1 : width - 1]
    box_weight = (1.0 - SHARPNESS_FACTOR) / 13.0
    inner.mul_(SHARPNESS_FACTOR + 4.0 * box_weight)
    for shift in range(3):
        inner.add_(rows[..., shift : width - 2 + shift], alpha=box_weight)
    return output.clamp_(0.0, 1.0)


@register_augmentation(
    "rolling",
    params=(
        ParamSpec("shift_y", -44.0, 44.0, integer=True, axis="y"),
        ParamSpec("shift_x", -44.0, 44.0, integer=True, axis="x"),
    ),
    identity={"shift_y": 0.0, "shift_x": 0.0},
    moves_data=True,
    check=False,
)
def _rolling(images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """torch.roll per sample: out[y, x] = in[(y - shift_y) mod H, (x - shift_x) mod W]."""
    batch, channels, height, width = images.shape
    device = images.device
    rows = (torch.arange(height, device=device) - p["shift_y"].long()[:, None]) % height
    cols = (torch.arange(width, device=device) - p["shift_x"].long()[:, None]) % width
    index = (rows[:, :, None] * width + cols[:, None, :]).view(batch, 1, height * width)
    flat = images.reshape(batch, channels, height * width)
    return flat.gather(2, index.expand(batch, channels, -1)).view_as(images)


@register_augmentation("grayscale", check=False)
def _grayscale_kernel(images: torch.Tensor, _: dict[str, torch.Tensor]) -> torch.Tensor:
    """F.rgb_to_grayscale(img, num_output_channels=3)."""
    return _grayscale(images).expand_as(images).contiguous()


@register_augmentation(
    "gaussian_blur", params=(ParamSpec("sigma", 0.1, 2.0, axis="xy"),), check=False
)
def _gaussian_blur(images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """F.gaussian_blur(img, k, sigma) per sample, k = gaussian_blur_kernel_size(H, W).

    Separable, one kernel per sample, with torchvision's reflect padding folded into the taps:
    out[i] += w[half + t] * x[reflect(i + t)] over shifted views, plus the few reflected rows
    and columns at the borders, so no padded copy is made.
    """
    size = gaussian_blur_kernel_size(*images.shape[-2:])
    weights = _gaussian_weights(size, p["sigma"].to(images.dtype))
    return _reflect_blur_axis(_reflect_blur_axis(images, weights, 2), weights, 3)


def _reflect_blur_axis(x: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """Correlate x (B, C, H, W) along ``dim`` with per-sample weights (B, k), reflect borders."""
    length = x.shape[dim]
    half = weights.shape[-1] // 2
    w = weights[:, :, None, None, None]  # tap j: (B, 1, 1, 1) broadcasts over (B, C, H, W)
    out = x * w[:, half]
    for t in range(1, half + 1):
        before, after = w[:, half - t], w[:, half + t]
        out.narrow(dim, t, length - t).addcmul_(x.narrow(dim, 0, length - t), before)
        out.narrow(dim, 0, length - t).addcmul_(x.narrow(dim, t, length - t), after)
        for i in range(t):  # neighbours beyond the border: F.pad 'reflect' mirrors at 0, n-1
            out.narrow(dim, i, 1).addcmul_(x.narrow(dim, t - i, 1), before)
            mirror = length - 1 - (t - i)
            out.narrow(dim, length - 1 - i, 1).addcmul_(x.narrow(dim, mirror, 1), after)
    return out


@register_augmentation(
    "brightness", params={"factor": (0.1, 2.5)}, identity={"factor": 1.0}, check=False
)
def _brightness(images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """F.adjust_brightness: clamp(f * img)."""
    return (images * _per_sample(p["factor"], images.dtype)).clamp_(0.0, 1.0)


@register_augmentation(
    "contrast", params={"factor": (0.01, 3.5)}, identity={"factor": 1.0}, check=False
)
def _contrast(images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """F.adjust_contrast: blend with the image's mean grayscale value."""
    mean = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, _per_sample(p["factor"], images.dtype))


@register_augmentation(
    "saturation", params={"factor": (0.01, 3.5)}, identity={"factor": 1.0}, check=False
)
def _saturation(images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """F.adjust_saturation: blend with the grayscale image."""
    return _blend(images, _grayscale(images), _per_sample(p["factor"], images.dtype))


@register_augmentation(
    "hue", params={"factor": (-0.5, 0.5)}, identity={"factor": 0.0}, check=False
)
def _hue(images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """F.adjust_hue: turn the HSV hue by ``factor`` (in turns) and go back to RGB.

    The hue is torchvision's ``_rgb_to_hsv`` written as h6 = 6 * hue (mod 6): (g - b) / chroma
    where r is the maximum, 2 + (b - r) / chroma where g is, 4 + (r - g) / chroma otherwise.
    Back to RGB by the closed form of torchvision's six-sector table: channel n (r, g, b: n =
    5, 3, 1) is min + chroma * clamp(|((h6 + n) mod 6) - 2| - 1, 0, 1). Both maps are
    continuous on the hue circle, so the reformulation moves results by float32 round-off only
    and saves torchvision's stack + gather of four candidate planes.
    """
    r, g, b = images.unbind(dim=1)
    minc, maxc = images.aminmax(dim=1)
    chroma = maxc - minc
    is_r = maxc == r
    is_g = (maxc == g).logical_and_(~is_r)
    numerator = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    # gray pixels (chroma 0) get hue 0 like torchvision; their chroma then zeroes the hue term
    h6 = numerator.div_(torch.where(chroma == 0, 1.0, chroma))
    h6.add_(torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0)))
    h6.add_(p["factor"].to(images.dtype).view(-1, 1, 1), alpha=6.0)
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=images.dtype, device=images.device)
    ramp = (h6[:, None] + offsets.view(1, 3, 1, 1)).remainder_(6.0).sub_(2.0).abs_()
    ramp = ramp.sub_(1.0).clamp_(0.0, 1.0)
    return ramp.mul_(chroma[:, None]).add_(minc[:, None])


@register_augmentation("hflip", moves_data=True, check=False)
def _hflip(images: torch.Tensor, _: dict[str, torch.Tensor]) -> torch.Tensor:
    """F.hflip."""
    return images.flip(-1)


@register_augmentation(
    "rotation", params={"angle": (-10.0, 10.0)}, identity={"angle": 0.0}, check=False
)
def _rotation(images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """F.affine(img, angle, [0, 0], s, [0, 0], BILINEAR) per sample, s = rotation_zoom(angle).

    Builds torchvision's inverse matrix [[cos/s, sin/s, 0], [-sin/s, cos/s, 0]] (in float64, as
    torchvision does in Python), its ``_affine_grid`` (pixel-centre coordinates normalised by
    half the size, align_corners=False) and samples with zero padding.
    """
    batch, _, height, width = images.shape
    dtype = images.dtype
    radians = torch.deg2rad(p["angle"])
    zoom = rotation_zoom(p["angle"], height, width)
    cos, sin = radians.cos() / zoom, radians.sin() / zoom
    # torchvision's rescaled theta^T / [W/2, H/2] (zero translation): row 0 multiplies x, row 1 y
    theta = torch.stack([cos, -sin, sin, cos], dim=1).to(dtype).view(batch, 2, 2)
    theta = theta / torch.tensor([0.5 * width, 0.5 * height], dtype=dtype, device=images.device)
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=images.device)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=images.device)
    xs, ys = xs.to(dtype).view(1, 1, width, 1), ys.to(dtype).view(1, height, 1, 1)
    # broadcast products instead of a matmul: no TF32 on CUDA, same float32 sums as torchvision
    grid = xs * theta[:, None, None, 0, :] + ys * theta[:, None, None, 1, :]
    return torch.nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


@register_augmentation(
    "elliptic_local_blur",
    params=(
        ParamSpec("a", 10.0, 32.0, axis="x"),
        ParamSpec("b", 10.0, 32.0, axis="y"),
        ParamSpec("shift_x", -32.0, 32.0, axis="x"),
        ParamSpec("shift_y", -32.0, 32.0, axis="y"),
        ParamSpec("angle", -15.0, 15.0),
    ),
    check=False,
)
def _elliptic_local_blur(images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Blur inside a per-sample ellipse, leave the rest.

    Pixels inside take the values of F.gaussian_blur(img, local_blur_kernel_size,
    local_blur_sigma) (reflect padding). Pixel (x, y) is inside when (u/a)^2 + (v/b)^2 <= 1
    with dx = x - ((W-1)/2 + shift_x), dy = y - ((H-1)/2 + shift_y), u = dx cos t - dy sin t,
    v = dx sin t + dy cos t, t = radians(angle): positive angles turn the a-axis
    counter-clockwise on screen (y points down), like F.affine and the reference's cv2.ellipse.

    Only a window around each ellipse is blurred: its side covers the largest semi-axis the
    bounds allow, and its rows and columns are gathered with reflect indices, so the blurred
    pixels equal those of the full-image blur at a fraction of the cost.
    """
    batch, channels, height, width = images.shape
    device = images.device
    size = local_blur_kernel_size(height, width)
    pad = size // 2
    reach = max(high for _, high in AUGMENTATIONS["elliptic_local_blur"].bounds(height, width)[:2])
    # + 1 px covers rounding the centre to a pixel (0.5) and the validation tolerance
    half = math.ceil(reach) + 1
    win_h, win_w = min(2 * half + 1, height), min(2 * half + 1, width)
    center_y = (height - 1) / 2 + p["shift_y"]
    center_x = (width - 1) / 2 + p["shift_x"]
    top = (center_y.round().long() - half).clamp_(0, height - win_h)
    left = (center_x.round().long() - half).clamp_(0, width - win_w)

    rows = _reflect_index(top[:, None] + torch.arange(-pad, win_h + pad, device=device), height)
    cols = _reflect_index(left[:, None] + torch.arange(-pad, win_w + pad, device=device), width)
    index = rows[:, :, None] * width + cols[:, None, :]  # (B, win_h + 2 pad, win_w + 2 pad)
    flat = images.reshape(batch, channels, height * width)
    window = flat.gather(2, index.view(batch, 1, -1).expand(-1, channels, -1))
    window = window.view(batch, channels, win_h + 2 * pad, win_w + 2 * pad)
    sigma = torch.tensor([local_blur_sigma(height, width)], dtype=images.dtype, device=device)
    blurred = _separable_blur(window, _gaussian_weights(size, sigma))
    original = window[..., pad : pad + win_h, pad : pad + win_w]

    radians = torch.deg2rad(p["angle"])
    cos, sin = radians.cos()[:, None], radians.sin()[:, None]
    dx = (left[:, None] + torch.arange(win_w, device=device)) - center_x[:, None]
    dy = (top[:, None] + torch.arange(win_h, device=device)) - center_y[:, None]
    # (B, W) and (B, H) terms combine into (B, H, W) without per-pixel trigonometry
    a, b = p["a"][:, None], p["b"][:, None]
    u = (-dy * sin / a).float()[:, :, None] + (dx * cos / a).float()[:, None, :]
    v = (dy * cos / b).float()[:, :, None] + (dx * sin / b).float()[:, None, :]
    inside = (u * u + v * v) <= 1.0
    values = torch.where(inside[:, None], blurred, original).reshape(batch, channels, -1)
    inner = index[:, pad : pad + win_h, pad : pad + win_w].reshape(batch, 1, -1)
    out = flat.clone()
    return out.scatter_(2, inner.expand(-1, channels, -1), values).view_as(images)


def _reflect_index(index: torch.Tensor, length: int) -> torch.Tensor:
    """Indices outside [0, length) mirrored without repeating the edge (F.pad 'reflect')."""
    index = torch.where(index < 0, -index, index)
    return torch.where(index > length - 1, 2 * (length - 1) - index, index)

