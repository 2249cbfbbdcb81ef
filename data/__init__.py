"""LightningDataModules: procedural planted-factor images and class-folder image datasets.

Images are float32 (3, H, W) in [0, 1], labels int64; no normalisation (the model does it).
"""

from data.common import check_num_classes
from data.folder import ImageFolderDataModule
from data.planted import PlantedFactorDataModule

__all__ = ["ImageFolderDataModule", "PlantedFactorDataModule", "check_num_classes"]
