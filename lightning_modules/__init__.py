"""LightningModules: ``ImageClassifier`` trains or loads torchvision classification networks."""

from lightning_modules.classifier import ImageClassifier

__all__ = ["ImageClassifier"]
