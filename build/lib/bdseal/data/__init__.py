"""Data: the uint8 NCHW container, dataset sources, batched augmentation and defender subsets."""

from .augment import build_augment, list_augments, rand_augment, random_crop_flip, simclr_augment, to_float
from .dataset import DataError, DataSplits, ImageDataset
from .sources import SOURCES, list_datasets, load_dataset, make_dataset
from .subsets import per_class_subset, split_holdout, stratified_subsample

__all__ = [
    "DataError",
    "DataSplits",
    "ImageDataset",
    "SOURCES",
    "build_augment",
    "list_augments",
    "list_datasets",
    "load_dataset",
    "make_dataset",
    "per_class_subset",
    "rand_augment",
    "random_crop_flip",
    "simclr_augment",
    "split_holdout",
    "stratified_subsample",
    "to_float",
]
