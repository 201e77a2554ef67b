"""A local image folder (torchvision ImageFolder layout), held in memory or read on demand."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from attnbench.data.base import (DataError, DataSplits, _channel_stats, _check_fractions, _check_nonempty,
                                 _in_memory_splits, _resize, stratified_split)
from attnbench.data.registry import register_dataset

class LazyImageDataset(Dataset):
    """Image files read on demand (large ImageFolder trees); items like :class:`ImageTensorDataset`."""

    def __init__(self, samples: Sequence[tuple[str, int]], mode: str, mean: Sequence[float],
                 std: Sequence[float], img_size: int) -> None:
        self.samples = list(samples)
        self.mode = mode
        self.img_size = int(img_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def raw(self, i: int) -> torch.Tensor:
        """Image ``i`` as float (C, img_size, img_size) in [0, 1], not normalised."""
        path = self.samples[i][0]
        return _resize(_read_image(path, self.mode)[None].float() / 255.0, self.img_size)[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.raw(i) - self.mean) / self.std, torch.tensor(self.samples[i][1])




# --- image folder -------------------------------------------------------------------------------

def _read_image(path: str, mode: str) -> torch.Tensor:
    """One image file as uint8 (C, H, W) in ``mode`` (``RGB`` or ``L``)."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert(mode), dtype=np.uint8)
    except Exception as err:  # noqa: BLE001 - any decoder error is one line about the file
        raise DataError(f"imagefolder: '{path}' is not a readable image ({type(err).__name__}: {err})") from None
    return torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)


def _scan_folder(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets import ImageFolder
    try:
        tree = ImageFolder(str(folder), loader=lambda p: p)   # scans only; no image is opened
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"imagefolder: '{folder}' is not an image folder ({err}); expected one sub-folder per "
                        "class holding image files (root/<class>/<image>.png), or train/ and test/ "
                        "sub-trees of that shape") from None
    if len(tree.classes) < 2:   # one class: every prediction is right, top-1 100% whatever the model
        raise DataError(f"imagefolder: '{folder}' holds {len(tree.classes)} class folder ('{tree.classes[0]}'); "
                        f"a classification needs at least 2 (root/<class>/<image>.png, one sub-folder per class)")
    return list(tree.classes), [(path, label) for path, label in tree.samples]


@register_dataset("imagefolder", needs_root=True)
def _load_imagefolder(root: Path, seed: int, *, img_size: int = 32, grayscale: bool = False,
                      val_fraction: float = 0.15, test_fraction: float = 0.2, in_memory: bool = True,
                      stats_samples: int = 2000, flips_preserve_labels: bool = False) -> DataSplits:
    """Images in a local folder: root/<class>/<image>, or root/{train,test}/<class>/<image>.

    ``flips_preserve_labels``: the user's declaration that mirrored images keep their class
    (the loader cannot know; horizontal-flip augmentation is refused until it is set).
    """
    if not root.exists():
        raise DataError(f"imagefolder: path '{root}' does not exist; expected a folder with one sub-folder "
                        "per class (root/<class>/<image>.png)")
    if not root.is_dir():
        raise DataError(f"imagefolder: path '{root}' is not a folder; expected one sub-folder per class")
    held_out = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and held_out is not None:
        classes, pool = _scan_folder(root / "train")
        test_classes, test_samples = _scan_folder(held_out)
        if test_classes != classes:
            raise DataError(f"imagefolder: classes of '{held_out}' ({', '.join(test_classes)}) differ from "
                            f"those of '{root / 'train'}' ({', '.join(classes)})")
        _check_fractions("imagefolder", val_fraction)
        train_idx, val_idx = stratified_split([y for _, y in pool], (1 - val_fraction, val_fraction), seed)
        samples = pool + test_samples
        parts = (train_idx, val_idx, np.arange(len(pool), len(samples)))
    else:
        classes, samples = _scan_folder(root)
        _check_fractions("imagefolder", val_fraction, test_fraction)
        parts = stratified_split([y for _, y in samples], (1 - val_fraction - test_fraction, val_fraction,
                                                           test_fraction), seed)
    mode = "L" if grayscale else "RGB"
    options = {"img_size": img_size, "grayscale": grayscale, "val_fraction": val_fraction,
               "test_fraction": test_fraction, "in_memory": in_memory,
               "flips_preserve_labels": flips_preserve_labels}
    if in_memory:
        images = torch.stack([_resize(_read_image(p, mode)[None].float(), img_size)[0].round().to(torch.uint8)
                              for p, _ in samples])
        labels = torch.tensor([y for _, y in samples], dtype=torch.long)
        return _in_memory_splits("imagefolder", images, labels, parts, img_size, classes, seed, options)
    _check_nonempty("imagefolder", parts, len(samples))
    train_samples = [samples[i] for i in parts[0]]
    probe = LazyImageDataset(train_samples, mode, (), (), img_size)
    picks = np.random.default_rng(seed).permutation(len(train_samples))[:stats_samples]
    mean, std = _channel_stats(torch.stack([probe.raw(int(i)) for i in picks]))

    def part(idx):
        return LazyImageDataset([samples[i] for i in idx], mode, mean, std, img_size)

    return DataSplits("imagefolder", part(parts[0]), part(parts[1]), part(parts[2]), len(classes),
                      1 if grayscale else 3, img_size, mean, std, classes, seed, options)
