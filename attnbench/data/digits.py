"""scikit-learn's 8x8 handwritten digits, embedded in the scikit-learn wheel."""
from __future__ import annotations

import functools

import torch

from attnbench.data.base import DataSplits, _check_fractions, _in_memory_splits, stratified_split
from attnbench.data.registry import register_dataset

# --- digits -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    digits = load_digits()                        # read from the installed wheel, never downloaded
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)   # (1797, 1, 8, 8) in [0, 1]
    return images, torch.from_numpy(digits.target).long()


@register_dataset("digits")
def _load_digits(seed: int, *, img_size: int = 8, val_fraction: float = 0.15,
                 test_fraction: float = 0.2) -> DataSplits:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes, 1 channel), embedded."""
    _check_fractions("digits", val_fraction, test_fraction)
    images, labels = _digits_arrays()
    parts = stratified_split(labels.numpy(), (1 - val_fraction - test_fraction, val_fraction, test_fraction), seed)
    return _in_memory_splits("digits", images, labels, parts, img_size, [str(i) for i in range(10)], seed,
                             {"img_size": img_size, "val_fraction": val_fraction, "test_fraction": test_fraction})


