"""ImageClassifier: a torchvision classification network as a LightningModule."""

from __future__ import annotations

import contextvars
import math
import os
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from data.common import check_num_classes
from lightning_modules.architectures import (
    ALEXNET_MIN_SIZE,
    SMALL_INPUT_MAX_SIZE,
    build_network,
    has_small_input_variant,
    make_small_input,
)
from lightning_modules.weights import (
    CORRUPT_FILE_ERRORS,
    load_network_state,
    read_weights,
    unreadable_file,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Set while load_from_checkpoint builds the module: the checkpoint holds every parameter, so the
# initial weights named in the hyperparameters are not read (they may be absent on this machine).
_RESTORING_CHECKPOINT = contextvars.ContextVar("restoring_checkpoint", default=False)


class ImageClassifier(pl.LightningModule):
    """Train or load a torchvision classification network on images in [0, 1].

    Args:
        arch: any torchvision classification model name (``torchvision.models.list_models(
            module=torchvision.models)``), e.g. "resnet18", "alexnet", "vgg11".
        num_classes: outputs of the classification head (>= 2).
        weights: initial weights, or None for torchvision's random initialisation:
            - a path to a plain torchvision state dict (``torch.save(model.state_dict(), p)``),
              read with ``torch.load(weights_only=True)``;
            - a torchvision weights enum name of ``arch`` ("IMAGENET1K_V1", "DEFAULT" or
              "ResNet18_Weights.IMAGENET1K_V1"), read from the torch hub cache
              (``<torch.hub.get_dir()>/checkpoints/<file name of the weights URL>``). Nothing is
              ever downloaded: a missing file is a FileNotFoundError saying where to put it.
            All keys must match ``arch`` (another architecture is a ValueError). When
            ``num_classes`` differs from the file's class count the head keeps its random
            initialisation (with a warning) and everything else is loaded; likewise the stem of
            a small-input variant when the file has the stock stem.
        small_input: use the small-input variant for 32-64 px images (ResNet, AlexNet and VGG
            families; only the stem changes, module names stay torchvision's:
            ``lightning_modules.architectures``). None (auto) chooses it when ``image_size``
            <= 64, no ``weights`` are given (pretrained weights imply the stock network) and
            the family has one.
        image_size: side of the (square) input images in px, used by ``small_input`` = None,
            to refuse stock AlexNet below 63 px and to build a vision transformer for it
            (``architectures.build_network``); the training CLI links it to the data's
            ``image_size``.
        optimizer: "sgd" (momentum, optional Nesterov) or "adamw".
        lr: peak learning rate; the schedule is a linear warmup over ``warmup_epochs`` then a
            cosine decay to 0 at the end of training (trainer.max_epochs or max_steps), per step.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay, on all parameters.
        momentum: SGD momentum (ignored by AdamW).
        nesterov: Nesterov momentum for SGD.
        warmup_epochs: epochs of linear learning-rate warmup (0 for none).

    ``forward(x)`` takes (B, 3, H, W) float in [0, 1] and returns logits (B, num_classes); it
    normalises with the ImageNet mean/std first (``normalize``), so augmentations act on [0, 1]
    images before normalisation. ``net`` is the torchvision model: hook names are torchvision's.
    ``small_input`` holds the resolved variant choice (bool); ``weights_source`` describes the file
    the initial weights came from (None for random init and for ``load_from_checkpoint``).

    Metrics (torchmetrics, micro-averaged): ``train/loss``, ``train/acc1`` (per epoch),
    ``val/loss``, ``val/acc1`` and ``val/acc5``. ``val/acc5`` is top-min(5, num_classes)
    accuracy, so with fewer than 5 classes it is top-num_classes accuracy, always 1.

    Raises:
        ValueError: num_classes < 2, an unknown optimizer or architecture, lr <= 0, negative
            weight decay or warmup, small_input=True for a family without a variant, stock
            AlexNet below 63 px, or weights of another architecture.
        FileNotFoundError: a weights file, or a weights enum's file in the hub cache, that is
            not there.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 4,
        weights: str | None = None,
        small_input: bool | None = None,
        image_size: int | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        nesterov: bool = False,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        if lr <= 0 or weight_decay < 0 or warmup_epochs < 0:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0 and warmup_epochs >= 0; got lr={lr}, "
                f"weight_decay={weight_decay}, warmup_epochs={warmup_epochs}"
            )
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.save_hyperparameters()
        self.net = build_network(arch, num_classes, image_size)
        if small_input is None:
            small_input = (
                image_size is not None
                and image_size <= SMALL_INPUT_MAX_SIZE
                and weights is None
                and has_small_input_variant(self.net)
            )
        self.small_input = small_input
        replaced = make_small_input(self.net, arch) if small_input else []
        if (
            arch == "alexnet"
            and not small_input
            and image_size is not None
            and image_size < ALEXNET_MIN_SIZE
        ):
            raise ValueError(
                f"stock AlexNet needs images of >= {ALEXNET_MIN_SIZE} px, got image_size="
                f"{image_size}; use small_input=True"
            )
        self.weights_source = None
        if weights is not None and not _RESTORING_CHECKPOINT.get():
            state, self.weights_source = read_weights(arch, weights)
            load_network_state(
                self.net,
                state,
                arch=arch,
                num_classes=num_classes,
                replaced=replaced,
                source=self.weights_source,
            )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike,
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool | None = True,
        **kwargs: Any,
    ) -> ImageClassifier:
        """Restore a module saved by Lightning (e.g. by ``train.py``'s ModelCheckpoint).

        The ``weights`` hyperparameter is kept as a record but not read: the checkpoint already
        holds every parameter.

        Args:
            checkpoint_path: the .ckpt file.
            map_location, hparams_file, strict, **kwargs: as Lightning's.
            weights_only: read with ``torch.load(weights_only=True)`` (the default: Lightning
                checkpoints of this module hold only tensors and primitive types).

        Returns:
            The restored module.

        Raises:
            ValueError: a file that cannot be read that way (random or damaged bytes, other
                pickled objects), naming it.
        """
        token = _RESTORING_CHECKPOINT.set(True)
        try:
            return super().load_from_checkpoint(
                checkpoint_path,
                map_location=map_location,
                hparams_file=hparams_file,
                strict=strict,
                weights_only=weights_only,
                **kwargs,
            )
        except CORRUPT_FILE_ERRORS:
            raise unreadable_file(checkpoint_path, "checkpoint") from None
        finally:
            _RESTORING_CHECKPOINT.reset(token)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet mean/std normalisation.

        Args:
            x: (B, 3, H, W) float in [0, 1].

        Returns:
            (B, 3, H, W) normalised images.
        """
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify images.

        Args:
            x: (B, 3, H, W) float in [0, 1].

        Returns:
            (B, num_classes) logits.

        Raises:
            ValueError: ``x`` not (B, 3, H, W).
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(x.shape)}")
        return self.net(self.normalize(x))

    def setup(self, stage: str) -> None:
        """Fail early when the datamodule's class count differs from the model's.

        Args:
            stage: Lightning's stage (any).

        Raises:
            ValueError: the class counts differ.
        """
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "num_classes"):
            check_num_classes(self.hparams.num_classes, datamodule)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        """Cross-entropy loss of a batch (images (B, 3, H, W) in [0, 1], labels (B,)); logs it."""
        images, labels = batch
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels)
        self.train_acc1(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc1", self.train_acc1, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log the loss, top-1 and top-5 accuracy of a validation batch."""
        images, labels = batch
        logits = self(images)
        self.val_acc1(logits, labels)
        self.val_acc5(logits, labels)
        self.log("val/loss", nn.functional.cross_entropy(logits, labels), sync_dist=True)
        self.log("val/acc1", self.val_acc1, prog_bar=True)
        self.log("val/acc5", self.val_acc5)

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer and its per-step schedule: linear warmup, then cosine decay to 0.

        Returns:
            Lightning's {"optimizer", "lr_scheduler"} dict.

        Raises:
            ValueError: a training of unknown length (no max_epochs or max_steps), or warmup
                with a training set of unknown length.
        """
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(),
                lr=hp.lr,
                momentum=hp.momentum,
                nesterov=hp.nesterov,
                weight_decay=hp.weight_decay,
            )
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "the cosine learning-rate schedule needs a finite training length: set "
                "trainer.max_epochs or trainer.max_steps"
            )
        warmup = 0
        if hp.warmup_epochs:
            per_epoch = self.trainer.num_training_batches / self.trainer.accumulate_grad_batches
            if not math.isfinite(per_epoch):
                raise ValueError("warmup_epochs needs a training set of known length; use 0")
            warmup = min(int(total), math.ceil(hp.warmup_epochs * per_epoch))

        def factor(step: int) -> float:
            """The learning-rate multiplier at ``step``."""
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, int(total) - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
