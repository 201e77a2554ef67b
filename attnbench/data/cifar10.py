"""CIFAR-10 from its local python batches (cifar-10-batches-py)."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import numpy as np

from attnbench.data.base import DataError, DataSplits, _check_fractions, _official_test_splits
from attnbench.data.registry import register_dataset

# --- CIFAR-10 python batches --------------------------------------------------------------------

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_folder(root: Path) -> Path:
    if not root.exists():
        raise DataError(f"cifar10: path '{root}' does not exist; expected the folder 'cifar-10-batches-py' "
                        f"(with {', '.join(CIFAR10_TRAIN_BATCHES)}, {CIFAR10_TEST_BATCH}) or its parent")
    if not root.is_dir():
        raise DataError(f"cifar10: path '{root}' is not a folder; expected the folder 'cifar-10-batches-py' "
                        "or its parent")
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    missing = [n for n in (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH) if not (folder / n).is_file()]
    if missing:
        raise DataError(f"cifar10: folder '{folder}' lacks {', '.join(missing)}; expected CIFAR-10's python "
                        f"batches {', '.join(CIFAR10_TRAIN_BATCHES)} and {CIFAR10_TEST_BATCH} "
                        "(the 'python version' archive, extracted)")
    return folder


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    expected = "a pickled dict with b'data' (N x 3072 uint8) and b'labels' (N ints in 0..9)"
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as err:  # noqa: BLE001 - any unpickling error is one line about the file
        raise DataError(f"cifar10: '{path}' could not be unpickled ({type(err).__name__}: {err}); "
                        f"expected {expected}") from None
    if not isinstance(batch, dict):
        raise DataError(f"cifar10: '{path}' holds a {type(batch).__name__}; expected {expected}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        hint = " (b'fine_labels' means CIFAR-100, which this loader does not read)" if "fine_labels" in batch else ""
        raise DataError(f"cifar10: '{path}' has keys {sorted(batch)}; expected {expected}{hint}")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise DataError(f"cifar10: '{path}' has data of shape {data.shape} and {labels.shape[0]} labels; "
                        f"expected {expected}")
    if data.dtype != np.uint8 or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"cifar10: '{path}' has data of type {data.dtype} and labels in "
                        f"[{labels.min()}, {labels.max()}]; expected {expected}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


@register_dataset("cifar10", needs_root=True, flips_preserve_labels=True)
def _load_cifar10(root: Path, seed: int, *, img_size: int = 32, val_fraction: float = 0.1,
                  max_train: Optional[int] = None, max_test: Optional[int] = None) -> DataSplits:
    """CIFAR-10 from its local python batches (cifar-10-batches-py); the official test batch is the test split."""
    _check_fractions("cifar10", val_fraction)
    folder = _cifar_folder(root)
    train = [_read_cifar_batch(folder / n) for n in CIFAR10_TRAIN_BATCHES]
    x_pool = np.concatenate([x for x, _ in train])
    y_pool = np.concatenate([y for _, y in train])
    x_test, y_test = _read_cifar_batch(folder / CIFAR10_TEST_BATCH)
    options = {"img_size": img_size, "val_fraction": val_fraction, "max_train": max_train, "max_test": max_test}
    return _official_test_splits("cifar10", x_pool, y_pool, x_test, y_test, seed, val_fraction, max_train,
                                 max_test, img_size, list(CIFAR10_CLASSES), options)


