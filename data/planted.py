"""Procedural planted-factor images: the class is defined by one known factor (hue or shape).

Each image is one object (disc, square, triangle, cross, ring) on a grey-ish, low-contrast
textured background. Every other property (position, size, rotation, background, luminance) is
drawn independently of the class, so the planted factor is the only class signal:

- ``colour``: the class is the object's hue (well separated, saturated). Shapes are random and the
  object's luminance (ITU-R 601 luma, the grayscale torchvision computes) is drawn independently of
  the class, so grayscale removes every class cue and the class is invisible to a hue-blind model.
  (The saturation that fits the RGB gamut at a given luma depends on the hue, so saturation is
  part of the colour cue.)
- ``shape``: the class is the shape; hue and luminance are random. All shapes have the same area
  for a given size, so the pixel count carries no class information either.
- ``mixed``: the class is a (shape, hue) pair on a grid of shapes x hues.

A spurious cue (``nuisance="hue"``, with ``shape``): a benchmark with a known answer. In the train
split a configurable share of each class (``agreement``) has its class's hue (class k, the k-th
hue of the ``colour`` factor), the rest another class's hue; val and test break the agreement
(hue random over the class hues, or shifted to the next class's hue). A network that leans on
the hue instead of the shape is right on train and wrong on a shifted split.

Generation is vectorised in torch and deterministic from the seed (CPU generator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from data.common import LabelledSplitsDataModule, check_split, make_loader, sub_seed

SHAPES = ("disc", "square", "triangle", "cross", "ring")
# Hue palette in degrees; ordered so that the first k hues are as far apart as possible (>= 60).
HUES = {"red": 0.0, "green": 120.0, "blue": 240.0, "yellow": 60.0, "cyan": 180.0, "magenta": 300.0}
FACTORS = ("colour", "shape", "mixed")
NUISANCES = ("hue",)
EVAL_NUISANCES = ("random", "shifted")
# Generator sub-seed keys of the splits. Not 2: make_loader's shuffle stream is sub_seed(seed, 2).
SPLIT_SEED_KEYS = {"train": 0, "val": 1, "test": 3}
NUISANCE_STREAM = 1  # sub_seed(seed, split key, 1): the nuisance draws, apart from the images'
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale

HUE_JITTER = 8.0  # degrees either side of the class hue; leaves >= 44 degrees between classes
OBJECT_LUMA = (0.35, 0.65)
BACKGROUND_GREY = (0.25, 0.75)
SIZE = (0.12, 0.20)  # equal-area radius as a fraction of the image side
# Every shape extends at most 1.56 equal-area radii from its centre (the triangle's circumradius);
# one margin for all shapes keeps the position distribution independent of the class.
MARGIN = 1.6
MIN_IMAGE_SIZE = 16


@dataclass
class PlantedImages:
    """Images and the latent factors that made them.

    Attributes:
        images: (N, 3, S, S) float32 in [0, 1].
        labels: (N,) int64 class indices.
        shapes: (N,) int64 indices into ``SHAPES``.
        hues: (N,) float32 object hue in degrees, [0, 360).
        masks: (N, S, S) float32 object coverage in [0, 1] (anti-aliased).
        luma: (N,) float32 object luma in [0, 1].
        nuisance: (N,) int64 the class whose hue each object was given (the spurious cue), or
            None when the hue is not a nuisance.
    """

    images: torch.Tensor
    labels: torch.Tensor
    shapes: torch.Tensor
    hues: torch.Tensor
    masks: torch.Tensor
    luma: torch.Tensor
    nuisance: torch.Tensor | None = None


def factor_grid(factor: str, num_classes: int) -> tuple[int, int]:
    """How many shapes and hues a factor uses to make a number of classes.

    Args:
        factor: "colour", "shape" or "mixed".
        num_classes: the class count.

    Returns:
        (number of shapes, number of hues).

    Raises:
        ValueError: an unknown factor, or one that cannot make that many classes.
    """
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
    if factor == "colour":
        if not 2 <= num_classes <= len(HUES):
            raise ValueError(
                f"factor 'colour' supports 2..{len(HUES)} classes (hues {list(HUES)}), "
                f"got num_classes={num_classes}"
            )
        return 1, num_classes
    if factor == "shape":
        if not 2 <= num_classes <= len(SHAPES):
            raise ValueError(
                f"factor 'shape' supports 2..{len(SHAPES)} classes (shapes {list(SHAPES)}), "
                f"got num_classes={num_classes}"
            )
        return num_classes, 1
    # Most square grid with both factors varying, so a model needs both to classify.
    for n_shapes in range(math.isqrt(num_classes), 1, -1):
        n_hues = num_classes // n_shapes
        if n_shapes * n_hues == num_classes and n_shapes <= len(SHAPES) and n_hues <= len(HUES):
            return n_shapes, n_hues
    valid = sorted({s * h for s in range(2, len(SHAPES) + 1) for h in range(s, len(HUES) + 1)})
    raise ValueError(
        f"factor 'mixed' needs num_classes = shapes x hues with 2..{len(SHAPES)} shapes and "
        f"2..{len(HUES)} hues; got {num_classes}, use one of {valid}"
    )


def class_names(factor: str, num_classes: int) -> list[str]:
    """Readable class names.

    Args:
        factor: "colour", "shape" or "mixed".
        num_classes: the class count.

    Returns:
        Hue names, shape names, or "hue shape" pairs (shape-major), in class order.

    Raises:
        ValueError: as ``factor_grid``.
    """
    n_shapes, n_hues = factor_grid(factor, num_classes)
    hue_names = list(HUES)[:n_hues]
    if factor == "colour":
        return hue_names
    if factor == "shape":
        return list(SHAPES[:n_shapes])
    return [f"{h} {s}" for s in SHAPES[:n_shapes] for h in hue_names]


def hue_to_rgb(hue: torch.Tensor) -> torch.Tensor:
    """Fully saturated, full-value RGB of hues.

    Args:
        hue: (N,) degrees.

    Returns:
        (N, 3) RGB in [0, 1].
    """
    h = (hue % 360.0) / 60.0
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None]) % 6.0
    return 1.0 - torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def isoluminant_colour(hue: torch.Tensor, luma: torch.Tensor, chroma: torch.Tensor) -> torch.Tensor:
    """Colours of exactly a given hue and luma.

    colour = luma + s * (p - luma(p)), p the pure hue: adding grey and scaling keep the hue, and
    the direction has zero luma, so the luma is ``luma`` whatever the hue.

    Args:
        hue: (N,) degrees.
        luma: (N,) ITU-R 601 luma in [0, 1].
        chroma: (N,) in (0, 1]: the share of the largest s that stays inside [0, 1]^3.

    Returns:
        (N, 3) RGB in [0, 1].
    """
    pure = hue_to_rgb(hue)
    direction = pure - (pure @ torch.tensor(LUMA))[:, None]
    y = luma[:, None]
    room = torch.where(direction > 0, (1.0 - y) / direction.clamp_min(1e-12), torch.inf)
    room = torch.where(direction < 0, y / (-direction).clamp_min(1e-12), room)
    s_max = room.min(dim=1, keepdim=True).values
    return (y + chroma[:, None] * s_max * direction).clamp(0.0, 1.0)


def _shape_sdf(shape: str, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, < 0 inside) of an equal-area shape; u, v (n, S, S), r (n, 1, 1).

    Every shape has area pi * r^2, so the object's pixel count does not reveal the shape.
    """
    if shape == "disc":
        return torch.sqrt(u * u + v * v) - r
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) - (math.sqrt(math.pi) / 2) * r
    if shape == "triangle":
        inradius = math.sqrt(math.pi / (3 * math.sqrt(3))) * r
        normals = [math.pi / 2 + 2 * math.pi * k / 3 for k in range(3)]
        edges = torch.stack([u * math.cos(a) + v * math.sin(a) for a in normals])
        return edges.max(dim=0).values - inradius
    if shape == "cross":
        arm = math.sqrt(9 * math.pi / 20) * r  # two 2L x 2L/3 bars: area 20 L^2 / 9
        half_width = arm / 3
        bar_u = torch.maximum(u.abs() - arm, v.abs() - half_width)
        bar_v = torch.maximum(u.abs() - half_width, v.abs() - arm)
        return torch.minimum(bar_u, bar_v)
    if shape == "ring":
        outer = r / math.sqrt(1 - 0.55**2)
        inner = 0.55 * outer
        return (torch.sqrt(u * u + v * v) - (outer + inner) / 2).abs() - (outer - inner) / 2
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """(n,) float32 uniform in [low, high) from ``gen``."""
    return low + (high - low) * torch.rand(n, generator=gen)


def _backgrounds(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Grey-ish low-contrast textures (n, 3, S, S): grey level, faint tint, blobs, stripes."""
    grey = _uniform(n, *BACKGROUND_GREY, gen)[:, None, None, None]
    tint = 0.03 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    blobs = torch.nn.functional.interpolate(
        0.06 * torch.randn(n, 1, 6, 6, generator=gen),
        size=(size, size),
        mode="bicubic",
        align_corners=False,
    )
    angle = _uniform(n, 0.0, math.pi, gen)[:, None, None]
    period = _uniform(n, 4.0, 16.0, gen)[:, None, None] * size / 64
    phase = _uniform(n, 0.0, 2 * math.pi, gen)[:, None, None]
    amplitude = _uniform(n, 0.0, 0.05, gen)[:, None, None]
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    along = xx * torch.cos(angle) + yy * torch.sin(angle)
    stripes = amplitude * torch.sin(2 * math.pi * along / period + phase)
    return grey + tint + blobs + stripes[:, None]


def generate(
    factor: str,
    num_classes: int,
    per_class: int,
    image_size: int = 64,
    seed: int = 0,
    hue_classes: torch.Tensor | None = None,
) -> PlantedImages:
    """Generate planted-factor images, class-major; the same arguments give the same tensors.

    Args:
        factor: "colour", "shape" or "mixed" (module docstring).
        num_classes: C.
        per_class: images per class.
        image_size: S in px, >= 16.
        seed: the CPU generator's seed.
        hue_classes: ``shape`` only: (C * per_class,) int64 in [0, C), the class whose hue (as
            the ``colour`` factor's, jitter included) each image gets instead of a random hue.
            Every other property is drawn exactly as without it, so the images differ from the
            hue-free ones in the object's colour only.

    Returns:
        C * per_class images with their factors.

    Raises:
        ValueError: a factor that cannot make C classes, S < 16, per_class < 1, or hue_classes
            with another factor or of the wrong length or range.
    """
    n_hues = factor_grid(factor, num_classes)[1]
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} px, got {image_size}")
    if per_class < 1:
        raise ValueError(f"images per class must be >= 1, got {per_class}")
    if hue_classes is not None:
        if factor != "shape":
            raise ValueError(f"hue_classes needs factor 'shape' (the hue is free), got {factor!r}")
        hue_classes = torch.as_tensor(hue_classes).long()
        if hue_classes.shape != (num_classes * per_class,) or not (
            0 <= int(hue_classes.min()) and int(hue_classes.max()) < num_classes
        ):
            raise ValueError(
                f"hue_classes must be ({num_classes * per_class},) class indices in "
                f"[0, {num_classes}), got shape {tuple(hue_classes.shape)}"
            )
        # The colour factor's hues for C classes: the first C, >= 60 degrees apart.
        n_hues = num_classes
    gen = torch.Generator().manual_seed(seed)
    n, s = num_classes * per_class, image_size
    labels = torch.arange(num_classes).repeat_interleave(per_class)

    class_hues = torch.tensor(list(HUES.values())[:n_hues])
    jitter = _uniform(n, -HUE_JITTER, HUE_JITTER, gen)
    random_hue = _uniform(n, 0.0, 360.0, gen)
    random_shape = torch.randint(len(SHAPES), (n,), generator=gen)
    # Every draw above is made whatever the factor and cue, so the rest of the stream (luma,
    # position, background...) and hence the images without a cue stay bit-identical.
    if factor == "colour":
        shapes, hues = random_shape, class_hues[labels] + jitter
    elif factor == "shape" and hue_classes is not None:
        shapes, hues = labels, class_hues[hue_classes] + jitter
    elif factor == "shape":
        shapes, hues = labels, random_hue
    else:  # class = shape * n_hues + hue
        shapes, hues = labels // n_hues, class_hues[labels % n_hues] + jitter
    hues = hues % 360.0
    luma = _uniform(n, *OBJECT_LUMA, gen)
    colours = isoluminant_colour(hues, luma, _uniform(n, 0.85, 1.0, gen))

    radius = _uniform(n, *SIZE, gen) * s
    margin = MARGIN * radius + 1.0
    cy = margin + (s - 1 - 2 * margin) * torch.rand(n, generator=gen)
    cx = margin + (s - 1 - 2 * margin) * torch.rand(n, generator=gen)
    angle = _uniform(n, 0.0, 2 * math.pi, gen)
    background = _backgrounds(n, s, gen)
    grain = 0.015 * torch.randn(n, 1, s, s, generator=gen)

    coords = torch.arange(float(s))
    dy = coords[None, :, None] - cy[:, None, None]
    dx = coords[None, None, :] - cx[:, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, cos * dy - sin * dx
    masks = torch.empty(n, s, s)
    for k, name in enumerate(SHAPES):
        idx = torch.nonzero(shapes == k).flatten()
        if idx.numel():
            sdf = _shape_sdf(name, u[idx], v[idx], radius[idx, None, None])
            masks[idx] = (0.5 - sdf).clamp(0.0, 1.0)  # one-pixel anti-aliased edge
    m = masks[:, None]
    images = (background * (1 - m) + colours[:, :, None, None] * m + grain).clamp(0.0, 1.0)
    return PlantedImages(
        images=images.float().contiguous(),
        labels=labels.long(),
        shapes=shapes.long(),
        hues=hues.float(),
        masks=masks,
        luma=luma.float(),
        nuisance=None if hue_classes is None else hue_classes.clone(),
    )


def nuisance_classes(
    split: str,
    num_classes: int,
    per_class: int,
    agreement: float,
    eval_nuisance: str,
    gen: torch.Generator,
) -> torch.Tensor:
    """The class whose hue each image of a class-major split gets (the spurious cue).

    Args:
        split: "train" (cue agrees with the class in a share ``agreement`` of each class) or
            "val" / "test" (agreement broken as ``eval_nuisance`` says).
        num_classes: C.
        per_class: images per class.
        agreement: train: exactly ``round(agreement * per_class)`` images of each class, at
            random positions, get their class's hue; the others a hue drawn uniformly from the
            other C - 1 classes', so every disagreement is a real one.
        eval_nuisance: val / test: "random" (uniform over the C classes, independent of the
            class) or "shifted" (class k gets class (k + 1) mod C's hue: the cue points to the
            wrong class).
        gen: the draws' generator.

    Returns:
        (C * per_class,) int64 class indices.
    """
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    if split == "train":
        n_agree = round(agreement * per_class)
        # Per class, the first n_agree of a random permutation of its positions agree.
        rank = torch.argsort(torch.rand(num_classes, per_class, generator=gen), dim=1).flatten()
        other = (labels + torch.randint(1, num_classes, labels.shape, generator=gen)) % num_classes
        return torch.where(rank < n_agree, labels, other)
    if eval_nuisance == "random":
        return torch.randint(num_classes, labels.shape, generator=gen)
    return (labels + 1) % num_classes


class PlantedFactorDataModule(LabelledSplitsDataModule):
    """Synthetic images whose class is one planted factor (``colour``, ``shape`` or ``mixed``).

    Generated in memory from ``seed`` (each split from its own sub-seed); no files. Batches are
    ``(images (B, 3, S, S) float32 in [0, 1], labels (B,) int64)``; no normalisation (the model
    normalises). ``colour`` supports 2..6 classes (red, green, blue, yellow, cyan, magenta),
    ``shape`` 2..5 (disc, square, triangle, cross, ring), ``mixed`` a shapes x hues grid (4, 6, 8,
    9, 10, 12, 15, 16, 18, 20, 24, 25 or 30 classes).

    With ``nuisance="hue"`` (``shape`` only) the object's hue is a spurious cue: in train it is
    its class's hue (the ``colour`` factor's k-th hue for class k) in exactly
    ``round(agreement * train_per_class)`` images of each class and another class's hue in the
    rest; in val and test it is random or shifted (``eval_nuisance``). ``nuisance_labels[split]``
    holds the class whose hue each image got. The class names stay the shape names.

    Args:
        factor: "colour", "shape" or "mixed".
        num_classes: C.
        image_size: S in px, >= 16.
        train_per_class, val_per_class: images per class of each split.
        seed: the seed of every split and of the train shuffle.
        batch_size: images per batch of the loaders.
        num_workers: loader processes.
        nuisance: None (no cue; the images are those of the plain factor) or "hue".
        agreement: train share of each class whose hue agrees with the class, in [0, 1].
        eval_nuisance: the val / test hue: "random" (uniform over the class hues, independent
            of the class) or "shifted" (class k gets class (k + 1) mod C's hue).
        test_per_class: > 0 adds a "test" split of that many images per class, generated as
            val from its own sub-seed, and ``test_dataloader``.

    Raises:
        ValueError: a factor that cannot make C classes, out-of-range sizes and counts, or a
            nuisance option that does not fit (named with the fix).
    """

    def __init__(
        self,
        factor: str = "colour",
        num_classes: int = 4,
        image_size: int = 64,
        train_per_class: int = 256,
        val_per_class: int = 64,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        nuisance: str | None = None,
        agreement: float = 1.0,
        eval_nuisance: str = "random",
        test_per_class: int = 0,
    ) -> None:
        super().__init__()
        self.class_names = class_names(factor, num_classes)  # validates factor and num_classes
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} px, got {image_size}")
        for name, value in (
            ("train_per_class", train_per_class),
            ("val_per_class", val_per_class),
            ("batch_size", batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if test_per_class < 0:
            raise ValueError(f"test_per_class must be >= 0 (0: none), got {test_per_class}")
        _check_nuisance(factor, nuisance, agreement, eval_nuisance)
        self.save_hyperparameters()
        self.factor = factor
        self.num_classes = num_classes
        self.image_size = image_size
        self.per_class = {"train": train_per_class, "val": val_per_class}
        if test_per_class:
            self.per_class["test"] = test_per_class
        self.splits = tuple(self.per_class)
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.nuisance = nuisance
        self.agreement = float(agreement)
        self.eval_nuisance = eval_nuisance
        self.datasets: dict[str, TensorDataset] = {}
        # split -> (N,) int64: the class whose hue each image got; empty without a nuisance.
        self.nuisance_labels: dict[str, torch.Tensor] = {}

    def split_data(self, split: str) -> PlantedImages:
        """Generate one split with its latent factors (deterministic; not cached).

        Args:
            split: "train", "val", or "test" (when ``test_per_class`` > 0).

        Returns:
            Its images, labels and factors (``nuisance`` set with a nuisance).

        Raises:
            ValueError: an unknown split.
        """
        check_split(split, self.splits)
        key = SPLIT_SEED_KEYS[split]
        hue_classes = None
        if self.nuisance == "hue":
            gen = torch.Generator().manual_seed(sub_seed(self.seed, key, NUISANCE_STREAM))
            hue_classes = nuisance_classes(
                split,
                self.num_classes,
                self.per_class[split],
                self.agreement,
                self.eval_nuisance,
                gen,
            )
        return generate(
            self.factor,
            self.num_classes,
            self.per_class[split],
            self.image_size,
            sub_seed(self.seed, key),
            hue_classes,
        )

    def setup(self, stage: str | None = None) -> None:
        """Generate every split once (every rank generates the same tensors).

        Args:
            stage: Lightning's stage (ignored: every split is generated).
        """
        for split in self.splits:
            if split not in self.datasets:
                data = self.split_data(split)
                self.datasets[split] = TensorDataset(data.images, data.labels)
                if data.nuisance is not None:
                    self.nuisance_labels[split] = data.nuisance

    def test_dataloader(self) -> DataLoader:
        """The test loader, in dataset order.

        Raises:
            ValueError: no test split (``test_per_class`` is 0).
        """
        if "test" not in self.splits:
            raise ValueError("no test split: set --data.test_per_class to a count > 0")
        return self._loader("test", shuffle=False)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """The loader of ``split`` (generated first when needed)."""
        self.setup()
        return make_loader(
            self.datasets[split], self.batch_size, self.num_workers, self.seed, shuffle
        )

    def _labels(self, split: str) -> torch.Tensor:
        """(N,) int64 labels of ``split``."""
        return self.datasets[split].tensors[1]

    def _images(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), 3, S, S) float32 in [0, 1]: the images at ``idx`` of ``split``."""
        return self.datasets[split].tensors[0][idx]

    def more_images_hint(self, split: str) -> str:
        """The option to raise: ``--data.<split>_per_class``."""
        check_split(split, self.splits)
        return f"raise --data.{split}_per_class (now {self.per_class[split]})"


def _check_nuisance(
    factor: str, nuisance: str | None, agreement: float, eval_nuisance: str
) -> None:
    """Check the spurious-cue options of ``PlantedFactorDataModule``.

    Raises:
        ValueError: an unknown nuisance or eval_nuisance, agreement outside [0, 1], a hue
            nuisance without factor "shape" (with any other factor the hue is, or is part of,
            the class), or cue options set without a nuisance (they would do nothing).
    """
    if not 0.0 <= agreement <= 1.0:
        raise ValueError(f"agreement must be in [0, 1], got {agreement}")
    if eval_nuisance not in EVAL_NUISANCES:
        raise ValueError(f"eval_nuisance must be one of {EVAL_NUISANCES}, got {eval_nuisance!r}")
    if nuisance is None:
        if agreement != 1.0 or eval_nuisance != "random":
            raise ValueError(
                f"agreement={agreement} and eval_nuisance={eval_nuisance!r} act only on a "
                "nuisance: set --data.nuisance hue (with --data.factor shape) or leave them out"
            )
        return
    if nuisance not in NUISANCES:
        raise ValueError(f"nuisance must be None or one of {NUISANCES}, got {nuisance!r}")
    if factor != "shape":
        raise ValueError(
            f"nuisance 'hue' needs factor 'shape' (with factor {factor!r} the hue is, or is part "
            "of, the class): set --data.factor shape"
        )
