"""The one in-memory image container every data source returns.

Layout (documented once, used everywhere): images are ``uint8`` tensors of shape ``(N, C, H, W)``;
labels are ``int64`` of shape ``(N,)``. Models take float images in [0, 1] (they normalise
internally), so ``x.float() / 255`` is the only conversion anyone needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bdseal.errors import BdsealError


class DataError(BdsealError, ValueError):
    """Bad or missing data: wrong shapes/dtypes, missing files, unknown dataset names."""


@dataclass
class ImageDataset:
    """uint8 images ``(N, C, H, W)`` + int64 labels ``(N,)`` + class names."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise DataError("ImageDataset needs torch tensors for x and y")
        if self.x.dtype != torch.uint8:
            raise DataError(f"images must be uint8, got {self.x.dtype}")
        if self.x.ndim != 4 or self.x.shape[1] not in (1, 3):
            raise DataError(f"images must be (N, C, H, W) with C in (1, 3), got {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.ndim != 1:
            raise DataError(f"labels must be int64 of shape (N,), got {self.y.dtype} {tuple(self.y.shape)}")
        if len(self.y) != len(self.x):
            raise DataError(f"{len(self.x)} images but {len(self.y)} labels")
        if not self.classes:
            n = int(self.y.max()) + 1 if len(self.y) else 0
            self.classes = [str(i) for i in range(n)]
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes)):
            raise DataError(f"labels outside [0, {len(self.classes)})")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, idx: torch.Tensor) -> "ImageDataset":
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.x.device)
        return ImageDataset(self.x[idx], self.y[idx.to(self.y.device)], list(self.classes))

    def to(self, device: torch.device | str) -> "ImageDataset":
        return ImageDataset(self.x.to(device), self.y.to(device), list(self.classes))

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the images in [0, 1] (for model input normalisation)."""
        xf = self.x.float().div_(255)
        return xf.mean(dim=(0, 2, 3)).tolist(), xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


@dataclass
class DataSplits:
    """A named dataset: train and test splits sharing class names."""

    name: str
    train: ImageDataset
    test: ImageDataset

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def to(self, device: torch.device | str) -> "DataSplits":
        return DataSplits(self.name, self.train.to(device), self.test.to(device))
