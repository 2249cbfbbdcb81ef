"""Data modules: planted-factor images (the class signal is the planted factor and nothing else)
and class-folder images (published pre-processing, balanced seeded subsets, bad-input errors)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import torch_threads
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torchvision import transforms as legacy_transforms

from data import ImageFolderDataModule, PlantedFactorDataModule, check_num_classes
from data.planted import HUES, LUMA, SHAPES, generate

# ---------------------------------------------------------------- planted factor


def small_planted(**kwargs) -> PlantedFactorDataModule:
    args = {"train_per_class": 12, "val_per_class": 6, "image_size": 64, "batch_size": 16}
    return PlantedFactorDataModule(**{**args, **kwargs})


@pytest.mark.parametrize(("factor", "num_classes"), [("colour", 4), ("shape", 5), ("mixed", 6)])
def test_planted_batches_shapes_dtypes_range(factor, num_classes):
    dm = small_planted(factor=factor, num_classes=num_classes)
    assert dm.num_classes == num_classes and len(dm.class_names) == num_classes
    assert len(set(dm.class_names)) == num_classes
    dm.setup("fit")
    for loader, per_class in ((dm.train_dataloader(), 12), (dm.val_dataloader(), 6)):
        images = torch.cat([x for x, _ in loader])
        labels = torch.cat([y for _, y in loader])
        assert images.shape == (num_classes * per_class, 3, 64, 64)
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert torch.equal(
            torch.bincount(labels, minlength=num_classes), torch.full((num_classes,), per_class)
        )


def test_planted_class_names_readable():
    assert small_planted(factor="colour", num_classes=3).class_names == ["red", "green", "blue"]
    assert small_planted(factor="shape", num_classes=2).class_names == ["disc", "square"]
    assert small_planted(factor="mixed", num_classes=4).class_names == [
        "red disc",
        "green disc",
        "red square",
        "green square",
    ]


def test_planted_is_deterministic_from_seed():
    a, b, c = small_planted(seed=3), small_planted(seed=3), small_planted(seed=4)
    for dm in (a, b, c):
        dm.setup()
    xa, ya = a.datasets["train"].tensors
    xb, yb = b.datasets["train"].tensors
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.allclose(xa, c.datasets["train"].tensors[0])
    # train and val come from different sub-seeds: no image is shared
    val = a.datasets["val"].tensors[0]
    distances = torch.cdist(val.flatten(1), xa.flatten(1))
    assert distances.min() > 1.0


def test_planted_probe_set_class_major_and_deterministic():
    dm = small_planted(num_classes=3)
    images, labels = dm.probe_set(4)
    assert images.shape == (12, 3, 64, 64) and images.dtype == torch.float32
    assert torch.equal(labels, torch.arange(3).repeat_interleave(4))
    again, _ = small_planted(num_classes=3).probe_set(4)
    assert torch.equal(images, again)
    train_images, _ = dm.probe_set(4, split="train")
    assert not torch.allclose(images, train_images)
    with pytest.raises(ValueError, match="only 6 images, 7 requested"):
        dm.probe_set(7)
    with pytest.raises(ValueError, match="split must be one of"):
        dm.probe_set(2, split="test")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factor": "texture"}, "factor must be one of"),
        ({"factor": "colour", "num_classes": 7}, "supports 2..6 classes"),
        ({"factor": "colour", "num_classes": 1}, "supports 2..6 classes"),
        ({"factor": "shape", "num_classes": 6}, "supports 2..5 classes"),
        ({"factor": "mixed", "num_classes": 7}, "shapes x hues"),
        ({"image_size": 8}, "image_size must be >= 16"),
        ({"val_per_class": 0}, "val_per_class must be >= 1"),
    ],
)
def test_planted_rejects_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_planted(**kwargs)


def test_planted_generation_is_fast():
    generate("colour", 4, 8)  # first call pays one-off kernel set-up
    # CPU time of one thread: neither other processes on a shared machine nor threads spinning
    # while they wait for a core count
    with torch_threads(1):
        start = time.process_time()
        generate("colour", 4, 375, image_size=64)
        seconds = time.process_time() - start
    assert seconds < 2.0, f"1500 images of 64 px took {seconds:.2f} CPU s (about 0.45 expected)"


def rgb_hue(rgb: torch.Tensor) -> torch.Tensor:
    """HSV hue in degrees of (N, 3) RGB."""
    r, g, b = rgb.unbind(1)
    return torch.rad2deg(torch.atan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360


def object_means(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean RGB (N, 3) over the fully covered object pixels."""
    inside = (masks > 0.99).float()[:, None]
    return (images * inside).sum((2, 3)) / inside.sum((2, 3))


def held_out_accuracy(train_x, train_y, test_x, test_y) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(train_x.numpy(), train_y.numpy())
    return float(model.score(test_x.numpy(), test_y.numpy()))


def chance_bound(num_classes: int, n_test: int) -> float:
    """Chance accuracy plus 5 standard errors of a held-out accuracy measured on n_test items."""
    p = 1 / num_classes
    return p + 5 * float(np.sqrt(p * (1 - p) / n_test))


def grey_features(data) -> torch.Tensor:
    """What a hue-blind observer sees: a grayscale 4x4 thumbnail, object area and luma."""
    grey = torch.einsum("nchw,c->nhw", data.images, torch.tensor(LUMA))
    thumbs = torch.nn.functional.avg_pool2d(grey[:, None], 16).flatten(1)
    inside = (data.masks > 0.99).float()
    area = data.masks.sum((1, 2))[:, None] / 64**2
    luma = ((grey * inside).sum((1, 2)) / inside.sum((1, 2)))[:, None]
    return torch.cat([thumbs, area, luma], dim=1)


def test_colour_classes_differ_by_hue_only():
    train, test = generate("colour", 4, 100, seed=11), generate("colour", 4, 100, seed=12)
    hues = rgb_hue(object_means(test.images, test.masks))
    class_hue = torch.tensor(list(HUES.values())[:4])[test.labels]
    error = ((hues - class_hue + 180) % 360 - 180).abs()
    # jitter is +-8 degrees; pixel grain and 8-bit-free rendering add well under 2 degrees
    assert error.max() < 10.0
    # luminance, size, position and background carry no class information
    accuracy = held_out_accuracy(
        grey_features(train), train.labels, grey_features(test), test.labels
    )
    assert accuracy < chance_bound(4, len(test.labels))
    # every shape occurs in every class
    for c in range(4):
        assert set(train.shapes[train.labels == c].tolist()) == set(range(len(SHAPES)))


def shape_features(masks: torch.Tensor) -> torch.Tensor:
    """Rotation-invariant mask geometry (N, 3): spread, fill near the centre, fill of the disc."""
    s = masks.shape[-1]
    coords = torch.arange(float(s))
    area = masks.sum((1, 2))
    cy = (masks * coords[None, :, None]).sum((1, 2)) / area
    cx = (masks * coords[None, None, :]).sum((1, 2)) / area
    dist = torch.sqrt(
        (coords[None, :, None] - cy[:, None, None]) ** 2
        + (coords[None, None, :] - cx[:, None, None]) ** 2
    )
    radius = torch.sqrt(area / np.pi)[:, None, None]
    spread = (masks * dist**2).sum((1, 2)) / (area * radius[:, 0, 0] ** 2)
    core = (masks * (dist < 0.4 * radius)).sum((1, 2)) / (np.pi * (0.4 * radius[:, 0, 0]) ** 2)
    disc = (masks * (dist < radius)).sum((1, 2)) / area
    return torch.stack([spread, core, disc], dim=1)


def test_shape_classes_differ_by_shape_only():
    train, test = generate("shape", 5, 100, seed=21), generate("shape", 5, 100, seed=22)
    assert (
        held_out_accuracy(
            shape_features(train.masks), train.labels, shape_features(test.masks), test.labels
        )
        > 0.95
    )

    # colour (image mean, object mean) and object area do not predict the class
    def colour_features(data):
        area = data.masks.sum((1, 2))[:, None] / 64**2
        return torch.cat(
            [data.images.mean((2, 3)), object_means(data.images, data.masks), area], dim=1
        )

    accuracy = held_out_accuracy(
        colour_features(train), train.labels, colour_features(test), test.labels
    )
    assert accuracy < chance_bound(5, len(test.labels))


def test_mixed_classes_are_shape_hue_pairs():
    data = generate("mixed", 6, 20, seed=5)  # 2 shapes x 3 hues
    assert torch.equal(data.shapes, data.labels // 3)
    class_hue = torch.tensor(list(HUES.values())[:3])[data.labels % 3]
    hues = rgb_hue(object_means(data.images, data.masks))
    assert (((hues - class_hue + 180) % 360 - 180).abs() < 10.0).all()


def test_check_num_classes():
    dm = small_planted(num_classes=3)
    check_num_classes(3, dm)
    with pytest.raises(ValueError, match=r"predicts 4 classes but the data .* has 3"):
        check_num_classes(4, dm)


# ---------------------------------------------------------------- image folders

CLASS_SIZES = {"cat": 5, "dog": 6, "emu": 7}


@pytest.fixture
def photo_folder(tmp_path: Path, sample_photos: torch.Tensor) -> Path:
    """root/<class>/<img> with 5, 6, 7 differently sized JPEG and PNG crops of the photos."""
    rng = np.random.default_rng(0)
    photos = (sample_photos * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    root = tmp_path / "images"
    for name, count in CLASS_SIZES.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            h, w = int(rng.integers(24, 60)), int(rng.integers(24, 60))
            y, x = int(rng.integers(0, 427 - h)), int(rng.integers(0, 640 - w))
            crop = Image.fromarray(photos[i % 2, y : y + h, x : x + w])
            crop.save(root / name / f"{name}_{i}.{'jpg' if i % 2 else 'png'}")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def split_files(dm: ImageFolderDataModule) -> dict[str, list[str]]:
    return {s: [p.name for p in dm.dataset(s).files] for s in ("train", "val")}


def test_folder_classes_batches_and_preprocessing(photo_folder):
    dm = ImageFolderDataModule(photo_folder, image_size=32, val_fraction=0.4, batch_size=4)
    assert dm.num_classes == 3 and dm.class_names == ["cat", "dog", "emu"]
    dm.setup("fit")
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and images.min() >= 0 and images.max() <= 1
    # the published pipeline: Resize(round(256 * 32 / 224) = 37), CenterCrop(32), ToTensor
    published = legacy_transforms.Compose(
        [
            legacy_transforms.Resize(37),
            legacy_transforms.CenterCrop(32),
            legacy_transforms.ToTensor(),
        ]
    )
    path = dm.dataset("val").files[0]
    with Image.open(path) as image:
        expected = published(image.convert("RGB"))
    # same uint8 pixels; x / 255 and x * (1 / 255) differ in the last float bit
    torch.testing.assert_close(images[0], expected, atol=1e-6, rtol=0)


def test_folder_split_is_stratified_deterministic_and_disjoint(photo_folder):
    dm = ImageFolderDataModule(photo_folder, val_fraction=0.4, seed=1)
    files = split_files(dm)
    assert not set(files["train"]) & set(files["val"])
    assert len(files["train"]) + len(files["val"]) == sum(CLASS_SIZES.values())
    val_labels = dm.dataset("val").labels
    assert [val_labels.count(c) for c in range(3)] == [2, 2, 3]  # round(0.4 * n) per class
    assert split_files(ImageFolderDataModule(photo_folder, val_fraction=0.4, seed=1)) == files
    assert split_files(ImageFolderDataModule(photo_folder, val_fraction=0.4, seed=2)) != files


def test_folder_balanced_subsets(photo_folder):
    dm = ImageFolderDataModule(photo_folder, images_per_class=4, val_fraction=0.25, seed=0)
    for split, per_class in (("train", 3), ("val", 1)):
        labels = dm.dataset(split).labels
        assert [labels.count(c) for c in range(3)] == [per_class] * 3
    chosen = {n for names in split_files(dm).values() for n in names}
    other = ImageFolderDataModule(photo_folder, images_per_class=4, val_fraction=0.25, seed=5)
    assert chosen != {n for names in split_files(other).values() for n in names}


def test_folder_probe_set(photo_folder):
    dm = ImageFolderDataModule(photo_folder, image_size=24, val_fraction=0.5)
    images, labels = dm.probe_set(2)
    assert images.shape == (6, 3, 24, 24)
    assert torch.equal(labels, torch.tensor([0, 0, 1, 1, 2, 2]))
    again, _ = ImageFolderDataModule(photo_folder, image_size=24, val_fraction=0.5).probe_set(2)
    assert torch.equal(images, again)
    with pytest.raises(ValueError, match="class 0 has only 2 images, 3 requested"):
        dm.probe_set(3)  # cat: 5 images, round(2.5) = 2 in val


def test_class_counts_and_how_to_grow_a_split(photo_folder):
    dm = ImageFolderDataModule(photo_folder, val_fraction=0.4)
    # cat 5, dog 6, emu 7 images: round(2.0), round(2.4), round(2.8) in val
    assert dm.class_counts("val") == [2, 2, 3] and dm.class_counts("train") == [3, 4, 4]
    assert dm.more_images_hint("val").startswith("raise --data.val_fraction (now 0.4) or add")
    assert dm.more_images_hint("train").startswith("lower --data.val_fraction (now 0.4) or add")
    subset = ImageFolderDataModule(photo_folder, images_per_class=4, val_fraction=0.25)
    assert "raise --data.images_per_class (now 4)" in subset.more_images_hint("val")
    planted = small_planted(num_classes=3)
    assert planted.class_counts("train") == [12] * 3 and planted.class_counts("val") == [6] * 3
    assert planted.more_images_hint("val") == "raise --data.val_per_class (now 6)"
    with pytest.raises(ValueError, match="split must be one of"):
        planted.class_counts("test")


def test_folder_bad_input(tmp_path, photo_folder):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataModule(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        ImageFolderDataModule(tmp_path / "file.txt")
    flat = tmp_path / "flat"
    flat.mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderDataModule(flat)
    with pytest.raises(ValueError, match=r"images_per_class=6; lower"):
        ImageFolderDataModule(photo_folder, images_per_class=6).setup()
    (photo_folder / "fox").mkdir()
    with pytest.raises(ValueError, match=r"fox has no image files"):
        ImageFolderDataModule(photo_folder).setup()


def test_folder_skips_corrupt_files_with_one_warning(photo_folder):
    for i in range(2):
        (photo_folder / "dog" / f"broken_{i}.jpg").write_bytes(b"\x00garbage" * 50)
    dm = ImageFolderDataModule(photo_folder, images_per_class=5, val_fraction=0.2)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\).*broken_"):
        dm.setup()
    names = {n for split in split_files(dm).values() for n in split}
    assert not any(n.startswith("broken") for n in names)
    labels = dm.dataset("train").labels + dm.dataset("val").labels
    assert [labels.count(c) for c in range(3)] == [5, 5, 5]  # corrupt files were replaced
    # a class whose files are all corrupt cannot be used
    only_broken = photo_folder / "yak"
    only_broken.mkdir()
    (only_broken / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="yak has no readable image"):
        ImageFolderDataModule(photo_folder).setup()
