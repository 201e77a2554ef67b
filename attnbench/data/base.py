"""What every data set shares: the error type, in-memory image sets, splits and normalisation."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class DataError(ValueError):
    """A data set that cannot be loaded; the message names the path and what was expected."""


# --- datasets and splits ------------------------------------------------------------------------

def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class ImageTensorDataset(Dataset):
    """Images held in memory; items are ``(normalised float image, label)``.

    Args:
        images: (N, C, H, W) uint8 (0..255) or float in [0, 1], at native size.
        labels: (N,) integer labels.
        mean, std: per-channel normalisation (from the training split).
        img_size: output side; images are resized on the fly when it differs.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], img_size: int) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images must be (N, C, H, W) with N labels, got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.img_size = int(img_size)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def targets(self) -> torch.Tensor:
        return self.labels

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The preprocessed images and labels at ``index`` (a 1-D tensor), in one go."""
        x = self.images[index]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (_resize(x, self.img_size) - self.mean) / self.std
        return x, self.labels[index]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(torch.tensor([i]))
        return x[0], y[0]

    def to(self, device: Union[str, torch.device]) -> "ImageTensorDataset":
        """A copy on ``device`` (the whole set moves once; batches are then free)."""
        out = ImageTensorDataset(self.images.to(device), self.labels.to(device), (), (), self.img_size)
        out.mean, out.std = self.mean.to(device), self.std.to(device)
        return out


@dataclasses.dataclass
class DataSplits:
    """Train / validation / test of one data set, preprocessed alike.

    Attributes:
        name: registered data set name.
        train, val, test: datasets of ``(image (C, H, W) float, label)``; in-memory ones are
            :class:`ImageTensorDataset` with a fast ``batch(index)``.
        num_classes, in_chans, img_size: what the model needs.
        mean, std: per-channel normalisation, computed on ``train``.
        classes: class names, index = label.
        seed: the split seed.
        options: the data set options used (for provenance).
        flips_preserve_labels: whether a horizontally mirrored image keeps its class (declared
            by the data set; horizontal-flip augmentation is refused otherwise).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    seed: int
    options: dict[str, Any]
    flips_preserve_labels: bool = False

    def model_kwargs(self) -> dict[str, Any]:
        """The model keywords these images decide (``create_model(..., **splits.model_kwargs())``)."""
        return {"num_classes": self.num_classes, "in_chans": self.in_chans, "img_size": self.img_size}

    def summary(self) -> dict[str, Any]:
        """Flat provenance fields (for a result row)."""
        return {"dataset": self.name, "data_seed": self.seed, "num_classes": self.num_classes,
                "in_chans": self.in_chans, "img_size": self.img_size, "n_train": len(self.train),
                "n_val": len(self.val), "n_test": len(self.test),
                **{f"data_{k}": v for k, v in self.options.items()}}


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices into len(fractions) parts, per class, deterministically from ``seed``.

    Each class's indices are permuted and cut by ``fractions`` (which must sum to 1; part 0
    takes the rounding remainder), so every part has about the class balance of the whole.
    Returns sorted index arrays, pairwise disjoint, covering every index.
    """
    labels = np.asarray(labels)
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        sizes = [int(round(f * len(idx))) for f in fractions[1:]]
        start = len(idx) - sum(sizes)
        parts[0].append(idx[:start])
        for p, size in enumerate(sizes, start=1):
            parts[p].append(idx[start:start + size])
            start += size
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    x = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    mean, std = x.mean(1), x.std(1).clamp_min(1e-6)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _check_fractions(name: str, val_fraction: float, test_fraction: float = 0.0) -> None:
    for label, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise DataError(f"dataset '{name}': {label} must lie in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(f"dataset '{name}': val_fraction + test_fraction must be < 1, "
                        f"got {val_fraction} + {test_fraction}")


def _check_nonempty(name: str, parts: Sequence[np.ndarray], total: int) -> None:
    for part, label in zip(parts, ("training", "validation", "test")):
        if len(part) == 0:
            raise DataError(f"dataset '{name}': the {label} split is empty ({total} images); "
                            "use more images or larger val_fraction / test_fraction")


def _in_memory_splits(name: str, images: torch.Tensor, labels: torch.Tensor, parts: Sequence[np.ndarray],
                      img_size: int, classes: list[str], seed: int, options: dict[str, Any]) -> DataSplits:
    """DataSplits from one in-memory pool and (train, val, test) index arrays."""
    _check_nonempty(name, parts, len(labels))
    train_idx = torch.as_tensor(parts[0], dtype=torch.long)
    mean, std = _channel_stats(images[train_idx])

    def part(idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageTensorDataset(images[idx], labels[idx], mean, std, img_size)

    return DataSplits(name, part(parts[0]), part(parts[1]), part(parts[2]), len(classes), images.shape[1],
                      img_size, mean, std, classes, seed, options)




def _official_test_splits(name: str, x_pool: np.ndarray, y_pool: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                          seed: int, val_fraction: float, max_train: Optional[int], max_test: Optional[int],
                          img_size: int, classes: list[str], options: dict[str, Any]) -> DataSplits:
    """DataSplits of a data set shipped as a training pool and an official test set (kept as the test split).

    ``max_train`` images are drawn from the pool (stratified, from ``seed``) before the validation
    split is carved out of them; ``max_test`` test images are drawn at random from ``seed``.
    """
    for label, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"dataset '{name}': {label} must be a whole number >= 1 or null, got {value!r}")
    rng = np.random.default_rng(seed)
    if max_train is not None and max_train < len(y_pool):   # a stratified subsample, same seed
        keep = stratified_split(y_pool, (1 - max_train / len(y_pool), max_train / len(y_pool)), seed)[1]
        x_pool, y_pool = x_pool[keep], y_pool[keep]
    if max_test is not None and max_test < len(y_test):
        keep = np.sort(rng.permutation(len(y_test))[:max_test])
        x_test, y_test = x_test[keep], y_test[keep]
    train_idx, val_idx = stratified_split(y_pool, (1 - val_fraction, val_fraction), seed)
    images = torch.from_numpy(np.concatenate([x_pool, x_test]))
    labels = torch.from_numpy(np.concatenate([y_pool, y_test]))
    test_idx = np.arange(len(y_pool), len(y_pool) + len(y_test))
    return _in_memory_splits(name, images, labels, (train_idx, val_idx, test_idx), img_size, classes, seed, options)
