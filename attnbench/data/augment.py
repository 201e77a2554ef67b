"""Training-batch augmentation: random crop with padding, horizontal flip, Mixup/CutMix, RandomErasing.

Everything is off by default; :class:`Augmentation` (``TrainConfig.augment``) says what is on and
is stored with every result. :class:`BatchAugmenter` applies it to whole normalised batches on
their device inside the training loop, so in-memory training stays fast; each image draws its
own crop, flip and erasing.

Mixup/CutMix and RandomErasing are timm's (``timm.data.Mixup``, ``timm.data.random_erasing.
RandomErasing``); the flip and the padding are torchvision's (``transforms.v2.functional``). The
crop is one indexing operation with a per-image offset: torchvision's ``RandomCrop`` draws one
offset per call, so a crop per image would take one Python call per image (measured: about 13 ms
for a batch of 128, a fifth of a training step on the CPU).

timm's transforms draw from Python's and NumPy's global random generators; the augmenter runs
them on its own generator states, seeded from the run's seed and swapped in only for the call,
so runs are reproducible and no caller's global random state changes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["Augmentation", "BatchAugmenter", "ERASE_MODES"]

ERASE_MODES = ("const", "rand", "pixel")   # timm RandomErasing's fills: 0 (the mean), per-channel or per-pixel normal


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Which augmentations a training run applies to its batches (all off by default).

    Attributes:
        crop_padding: pad each image by this many pixels (with black, the unnormalised 0) and
            crop a random window of the original size back out; 0: off.
        hflip: mirror each image left-right with probability 0.5. Only for data sets that
            declare flips label-preserving (not digits); refused otherwise.
        mixup_alpha: Mixup's Beta(alpha, alpha) mixing; 0: off.
        cutmix_alpha: CutMix's Beta(alpha, alpha) box size; 0: off. With both on, each batch
            picks one (CutMix with probability ``mix_switch_prob``). Mixing trains on soft
            targets (with the run's label smoothing) and soft-target cross-entropy.
        mix_prob: probability that a batch is mixed at all (when Mixup or CutMix is on).
        mix_switch_prob: probability of CutMix rather than Mixup when both are on.
        erase_prob: RandomErasing's probability per image; 0: off.
        erase_mode: RandomErasing's fill: ``const`` (0, the mean), ``rand`` (a normal value per
            channel) or ``pixel`` (a normal value per pixel).
    """

    crop_padding: int = 0
    hflip: bool = False
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    erase_prob: float = 0.0
    erase_mode: str = "pixel"

    def __post_init__(self):
        checks = [(isinstance(self.crop_padding, int) and not isinstance(self.crop_padding, bool)
                   and self.crop_padding >= 0, "crop_padding must be a whole number >= 0"),
                  (isinstance(self.hflip, bool), "hflip must be true or false"),
                  (self.mixup_alpha >= 0, "mixup_alpha must be >= 0"),
                  (self.cutmix_alpha >= 0, "cutmix_alpha must be >= 0"),
                  (0 <= self.mix_prob <= 1, "mix_prob must be in [0, 1]"),
                  (0 <= self.mix_switch_prob <= 1, "mix_switch_prob must be in [0, 1]"),
                  (0 <= self.erase_prob <= 1, "erase_prob must be in [0, 1]"),
                  (self.erase_mode in ERASE_MODES, f"erase_mode must be one of {', '.join(ERASE_MODES)}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"augment: {message}")

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (the targets are then soft)."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip or self.mixes or self.erase_prob > 0


class BatchAugmenter:
    """Applies an :class:`Augmentation` to normalised training batches ``(x, y)`` on their device.

    Args:
        augment: what to apply.
        num_classes: for Mixup/CutMix's soft targets.
        mean, std: the data's per-channel normalisation, so that padding is black (pixel 0).
        label_smoothing: folded into the soft targets when mixing.
        seed: seeds the augmenter's own Python and NumPy generator states (timm's draws).
        flips_preserve_labels: the data set's declaration; ``hflip`` is refused when False.

    Calling it returns ``(x, target)``: ``target`` is ``y`` unchanged unless batches are mixed,
    then (N, num_classes) soft targets for :class:`timm.loss.SoftTargetCrossEntropy`. ``x`` may be
    changed in place.
    """

    def __init__(self, augment: Augmentation, num_classes: int, mean: Sequence[float], std: Sequence[float], *,
                 label_smoothing: float = 0.0, seed: int = 0, flips_preserve_labels: bool = True) -> None:
        if augment.hflip and not flips_preserve_labels:
            raise ValueError("augment.hflip: the data set does not declare horizontal flips label-preserving "
                             "(a mirrored digit is not the same digit); turn hflip off")
        self.augment = augment
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)
        self._black = [-m / s for m, s in zip(mean, std)]        # pixel 0 after normalisation, per channel
        self._py_state = random.Random(seed).getstate()
        self._np_state = np.random.RandomState(seed).get_state()
        self._mixup = self._erase = None
        if augment.mixes:
            from timm.data import Mixup
            self._mixup = Mixup(mixup_alpha=augment.mixup_alpha, cutmix_alpha=augment.cutmix_alpha,
                                prob=augment.mix_prob, switch_prob=augment.mix_switch_prob, mode="batch",
                                label_smoothing=self.label_smoothing, num_classes=self.num_classes)
        self._erase_device: Optional[torch.device] = None

    @property
    def soft_targets(self) -> bool:
        return self._mixup is not None

    @contextlib.contextmanager
    def _own_random_state(self):
        """Run timm's draws on this augmenter's Python and NumPy states; restore the globals after."""
        saved_py, saved_np = random.getstate(), np.random.get_state()
        random.setstate(self._py_state)
        np.random.set_state(self._np_state)
        try:
            yield
        finally:
            self._py_state, self._np_state = random.getstate(), np.random.get_state()
            random.setstate(saved_py)
            np.random.set_state(saved_np)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF
        p = self.augment.crop_padding
        n, c, h, w = x.shape
        padded = TF.pad(x, [p], fill=self._black)
        top = torch.randint(0, 2 * p + 1, (n, 1), device=x.device)
        left = torch.randint(0, 2 * p + 1, (n, 1), device=x.device)
        rows = (top + torch.arange(h, device=x.device))[:, None, :, None]     # (N, 1, H, 1)
        cols = (left + torch.arange(w, device=x.device))[:, None, None, :]    # (N, 1, 1, W)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, chans, rows, cols]

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF
        mirror = torch.rand(x.shape[0], device=x.device) < 0.5
        return torch.where(mirror[:, None, None, None], TF.horizontal_flip(x), x)

    def _random_erasing(self, device: torch.device):
        if self._erase is None or self._erase_device != device:
            from timm.data.random_erasing import RandomErasing
            self._erase = RandomErasing(self.augment.erase_prob, mode=self.augment.erase_mode, device=device)
            self._erase_device = device
        return self._erase

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.augment
        if not a.active:
            return x, y
        if a.crop_padding > 0:
            x = self._crop(x)
        if a.hflip:
            x = self._flip(x)
        target = y
        with self._own_random_state():
            if self._mixup is not None:
                x, target = self._mix(x, y)
            if a.erase_prob > 0:
                x = self._random_erasing(x.device)(x)
        return x, target

    def _mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # timm mixes a batch with its mirror image and needs an even size: an odd last image
        # of an epoch is left unmixed, with the smoothed one-hot target of its own label.
        from timm.data.mixup import mixup_target
        even = x.shape[0] - x.shape[0] % 2
        if even == x.shape[0]:
            return self._mixup(x, y)
        target = mixup_target(y, self.num_classes, 1.0, self.label_smoothing)
        if even:
            x[:even], target[:even] = self._mixup(x[:even], y[:even])
        return x, target
