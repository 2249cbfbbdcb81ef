"""Class-folder image datasets (ILSVRC val or Places365 sorted into one folder per class)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from data.common import LabelledSplitsDataModule, check_split, make_loader, sub_seed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SHOWN_CORRUPT = 5


def preprocessing(image_size: int) -> v2.Compose:
    """Published ImageNet pre-processing scaled to an image size; no normalisation.

    Resize(round(256 * S / 224)) (shorter side, bilinear with antialias, on the PIL image as the
    classic pipeline) then CenterCrop(S).

    Args:
        image_size: S in px.

    Returns:
        A transform from a PIL image to (3, S, S) float32 in [0, 1].
    """
    return v2.Compose(
        [
            v2.Resize(round(256 * image_size / 224), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def is_readable_image(path: Path) -> bool:
    """Whether PIL recognises a file as an image with a consistent structure.

    ``Image.verify`` reads the header (and checks chunk CRCs for PNG) without decoding pixels, so
    it is cheap; a file truncated inside the pixel data can still pass and fails when loaded.

    Args:
        path: the file.

    Returns:
        True when it passes.
    """
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError):
        return False
    return True


class ImageFiles(Dataset):
    """Image files with labels; item = (image (3, S, S) float32 in [0, 1], label int).

    Args:
        files: the image files.
        labels: one class index per file.
        transform: PIL RGB image -> (3, S, S) tensor (``preprocessing``).
    """

    def __init__(self, files: list[Path], labels: list[int], transform: v2.Compose) -> None:
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        """Number of files."""
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(image, label) of file ``index``; RuntimeError naming a file that does not decode."""
        path = self.files[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:
            raise RuntimeError(
                f"cannot decode image {path} ({error}); remove or replace the file"
            ) from error
        return self.transform(rgb), self.labels[index]


class ImageFolderDataModule(LabelledSplitsDataModule):
    """Images in class subfolders: ``root/<class name>/<image>``; classes are the sorted folders.

    Files are those with an image extension (``IMAGE_EXTENSIONS``, case-insensitive); hidden
    files and folders are ignored. The same root, arguments and seed always give the same files
    in the same order. At ``setup`` every candidate file is checked with ``is_readable_image``;
    unreadable ones are skipped with one warning, and with ``images_per_class`` set the next
    files of the class in the seeded order take their place, so subsets stay balanced.

    Args:
        root: the folder of class subfolders.
        image_size: S in px of the published pre-processing (``preprocessing``).
        images_per_class: keep n readable images per class, chosen by ``seed``; None keeps all.
        val_fraction: share of each class in val (round(n_c * val_fraction), at least one and
            leaving at least one for train when 0 < val_fraction < 1): stratified splits.
        seed: seed of the choice, the split and the train shuffle.
        batch_size: images per batch of the loaders.
        num_workers: loader processes.

    Raises:
        ValueError: a missing root, no class folders, out-of-range arguments; at ``setup``, a
            class with no readable image, fewer than ``images_per_class`` or (with a split)
            fewer than 2.
        RuntimeError: when loaded, a file that passed the check but does not decode
            (e.g. truncated pixel data), naming it.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 224,
        images_per_class: int | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise ValueError(
                f"image folder root {self.root} does not exist; pass the folder "
                "that holds one subfolder per class"
            )
        if not self.root.is_dir():
            raise ValueError(
                f"image folder root {self.root} is not a directory; pass the folder "
                "that holds one subfolder per class"
            )
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1 px, got {image_size}")
        if images_per_class is not None and images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1 or None (all), got {images_per_class}")
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.class_dirs = sorted(
            p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not self.class_dirs:
            raise ValueError(
                f"image folder root {self.root} has no class subfolders; expected "
                f"{self.root}/<class name>/<image files> (sort flat ILSVRC/Places365 val "
                "images into one folder per class first)"
            )
        self.class_names = [p.name for p in self.class_dirs]
        self.num_classes = len(self.class_names)
        self.image_size = image_size
        self.images_per_class = images_per_class
        self.val_fraction = val_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.transform = preprocessing(image_size)
        self.datasets: dict[str, ImageFiles] = {}

    def _class_files(self, label: int, corrupt: list[Path]) -> list[Path]:
        """Readable files of one class in the seeded order, at most ``images_per_class``."""
        folder = self.class_dirs[label]
        files = sorted(
            p
            for p in folder.iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
        )
        if not files:
            raise ValueError(
                f"class folder {folder} has no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        order = np.random.default_rng(sub_seed(self.seed, 10, label)).permutation(len(files))
        kept: list[Path] = []
        for i in order:
            if len(kept) == self.images_per_class:
                break
            if is_readable_image(files[i]):
                kept.append(files[i])
            else:
                corrupt.append(files[i])
        if not kept:
            raise ValueError(
                f"class folder {folder} has no readable image; its {len(files)} "
                "files are all corrupt; replace them or remove the folder"
            )
        if self.images_per_class is not None and len(kept) < self.images_per_class:
            raise ValueError(
                f"class folder {folder} has {len(kept)} readable images ({len(files)} files) but "
                f"images_per_class={self.images_per_class}; lower images_per_class or add images"
            )
        return kept

    def _split(self, n: int, folder: Path) -> int:
        """Number of val images among a class's ``n``."""
        n_val = round(n * self.val_fraction)
        if 0.0 < self.val_fraction < 1.0:
            if n < 2:
                raise ValueError(
                    f"class folder {folder} has {n} image; a train/val split needs "
                    "at least 2 per class (or val_fraction 0 or 1)"
                )
            n_val = min(max(n_val, 1), n - 1)
        return n_val

    def setup(self, stage: str | None = None) -> None:
        """List, check and split the files once (every rank computes the same lists).

        Args:
            stage: Lightning's stage (ignored: both splits are set up).

        Raises:
            ValueError: a class folder without image files, without readable ones, with fewer
                than ``images_per_class``, or too few to split.
        """
        if self.datasets:
            return
        corrupt: list[Path] = []
        split_files: dict[str, list[Path]] = {"train": [], "val": []}
        split_labels: dict[str, list[int]] = {"train": [], "val": []}
        for label, folder in enumerate(self.class_dirs):
            files = self._class_files(label, corrupt)
            n_val = self._split(len(files), folder)
            for split, part in (("val", files[:n_val]), ("train", files[n_val:])):
                split_files[split] += part
                split_labels[split] += [label] * len(part)
        if corrupt:
            shown = ", ".join(str(p) for p in corrupt[:SHOWN_CORRUPT])
            more = ", ..." if len(corrupt) > SHOWN_CORRUPT else ""
            warnings.warn(
                f"skipped {len(corrupt)} unreadable image file(s) under {self.root}: {shown}{more}",
                stacklevel=2,
            )
        self.datasets = {
            s: ImageFiles(split_files[s], split_labels[s], self.transform) for s in split_files
        }

    def dataset(self, split: str) -> ImageFiles:
        """The dataset of a split (sets up the data first).

        Args:
            split: "train" or "val".

        Returns:
            Its files, class-major, in seeded order within a class.

        Raises:
            ValueError: an unknown split, or data that cannot be set up.
        """
        check_split(split)
        self.setup()
        return self.datasets[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """The loader of ``split``; ValueError when the split is empty."""
        data = self.dataset(split)
        if len(data) == 0:
            raise ValueError(
                f"the {split} split is empty (val_fraction={self.val_fraction}); "
                "choose val_fraction strictly between 0 and 1"
            )
        return make_loader(data, self.batch_size, self.num_workers, self.seed, shuffle)

    def _labels(self, split: str) -> torch.Tensor:
        """(N,) int64 labels of ``split``, in dataset order."""
        return torch.tensor(self.datasets[split].labels, dtype=torch.int64)

    def _images(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), 3, S, S) float32 in [0, 1]: the images at ``idx`` of ``split``, decoded."""
        data = self.datasets[split]
        return torch.stack([data[i][0] for i in idx.tolist()])

    def more_images_hint(self, split: str) -> str:
        """The options to change (val_fraction, images_per_class) or the folders to fill."""
        check_split(split)
        change = "raise" if split == "val" else "lower"  # val_fraction moves images to val
        options = [f"{change} --data.val_fraction (now {self.val_fraction})"]
        if self.images_per_class is not None:
            options.append(f"raise --data.images_per_class (now {self.images_per_class})")
        return f"{', '.join(options)} or add images to the class folders of {self.root}"
