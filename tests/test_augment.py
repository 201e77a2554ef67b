"""Batch augmentation: off by default, each option doing what it says, flips refused where labels change."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from attnbench import data, models, train
from attnbench.data.augment import Augmentation, BatchAugmenter
from attnbench.experiment import ExperimentError, parse_experiment

MEAN, STD = [0.25], [0.5]
BLACK = -MEAN[0] / STD[0]


def batch(n=64, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def augmenter(seed=0, flips=True, **options):
    return BatchAugmenter(Augmentation(**options), 10, MEAN, STD, label_smoothing=0.1, seed=seed,
                          flips_preserve_labels=flips)


def random_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_off_by_default_leaves_batches_and_random_states_untouched():
    assert train.TrainConfig().augment == Augmentation() and not Augmentation().active
    x, y = batch()
    before = random_states()
    out, target = augmenter()(x.clone(), y)
    assert torch.equal(out, x) and torch.equal(target, y) and target.dtype == torch.long
    after = random_states()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


def test_crop_is_a_per_image_window_of_the_black_padded_image():
    x, y = batch()
    out, _ = augmenter(crop_padding=2)(x.clone(), y)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=BLACK)
    offsets = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert hits, f"image {i} is not a window of its padded self"
        offsets.add(hits[0])
    assert len(offsets) > 5, "each image draws its own offset"
    assert (out == BLACK).any(), "padding is black (pixel 0 after normalisation)"


def test_flip_mirrors_about_half_the_images():
    x, y = batch()
    out, _ = augmenter(hflip=True)(x.clone(), y)
    mirrored = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 15 < sum(mirrored) < 49


def test_flips_are_refused_where_they_change_labels():
    with pytest.raises(ValueError, match="augment.hflip: the data set does not declare"):
        augmenter(hflip=True, flips=False)
    digits = data.load_dataset("digits")
    assert not digits.flips_preserve_labels and not data.flips_preserve_labels("mnist")
    assert data.flips_preserve_labels("fashion-mnist") and data.flips_preserve_labels("cifar10")
    model = models.create_model("vit_pico_patch2_8", "softmax", seed=0, num_classes=10, in_chans=1, img_size=8,
                                embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="hflip"):
        train.fit(model, digits, train.TrainConfig(epochs=1, max_steps=1, augment={"hflip": True}), progress=False)


EXPERIMENT = {"name": "a", "data": {"dataset": "digits"}, "train": {"epochs": 1}, "variants": ["softmax"]}


def test_experiment_files_validate_augmentation_up_front():
    e = parse_experiment(EXPERIMENT, "a.yaml")
    assert e.train.augment == Augmentation(), "the resolved augmentation is always recorded"
    with pytest.raises(ExperimentError, match=r"^a.yaml: field 'train.augment.hflip': data set 'digits' does not "
                                              r"declare horizontal flips label-preserving"):
        parse_experiment({**EXPERIMENT, "train": {"augment": {"hflip": True}}}, "a.yaml")
    ok = parse_experiment({**EXPERIMENT, "data": {"dataset": "fashion-mnist"},
                           "train": {"augment": {"hflip": True, "crop_padding": 4}}}, "a.yaml")
    assert ok.train.augment.hflip and ok.train.augment.crop_padding == 4
    folder = parse_experiment({**EXPERIMENT, "data": {"dataset": "imagefolder", "root": "x",
                                                      "options": {"flips_preserve_labels": True}},
                               "train": {"augment": {"hflip": True}}}, "a.yaml")
    assert folder.train.augment.hflip
    with pytest.raises(ExperimentError, match="set data.options.flips_preserve_labels: true"):
        parse_experiment({**EXPERIMENT, "data": {"dataset": "imagefolder", "root": "x"},
                          "train": {"augment": {"hflip": True}}}, "a.yaml")
    for augment, message in [({"crop_padding": -1}, "field 'train.augment.crop_padding': expected an integer >= 0"),
                             ({"hflip": "yes"}, "field 'train.augment.hflip': expected true or false"),
                             ({"mixup": 0.2}, "field 'train.augment.mixup': unknown field; did you mean 'mixup_alpha'"),
                             ({"erase_prob": 1.5}, "field 'train.augment': erase_prob must be in [0, 1]"),
                             ({"erase_mode": "zero"}, "field 'train.augment': erase_mode must be one of")]:
        with pytest.raises(ExperimentError, match=None) as err:
            parse_experiment({**EXPERIMENT, "train": {"augment": augment}}, "a.yaml")
        assert message in str(err.value), str(err.value)


@pytest.mark.parametrize("n", [64, 7], ids=["even", "odd"])
def test_mixup_and_cutmix_give_soft_targets_reproducibly(n):
    x, y = batch(n)
    out, target = augmenter(seed=3, mixup_alpha=0.8, cutmix_alpha=1.0)(x.clone(), y)
    assert target.shape == (n, 10) and torch.allclose(target.sum(1), torch.ones(n))
    assert not torch.equal(out[: n - n % 2], x[: n - n % 2])
    if n % 2:   # the odd last image stays as it is, with its smoothed one-hot target
        assert torch.equal(out[-1], x[-1])
        assert target[-1, y[-1]] == pytest.approx(0.9 + 0.01) and target[-1].max() == target[-1, y[-1]]
    before = random_states()
    again, target_again = augmenter(seed=3, mixup_alpha=0.8, cutmix_alpha=1.0)(x.clone(), y)
    after = random_states()
    assert torch.equal(again, out) and torch.equal(target_again, target)
    assert np.array_equal(before[1], after[1]) and before[2] == after[2], "NumPy's and Python's globals untouched"


@pytest.mark.parametrize("mode", ["const", "pixel"])
def test_random_erasing_erases_a_box_per_image(mode):
    x, y = batch(16, size=16)
    out, target = augmenter(erase_prob=1.0, erase_mode=mode)(x.clone(), y)
    assert torch.equal(target, y)
    changed = (out != x).flatten(1)
    assert changed.any(1).all(), "every image is erased somewhere at probability 1"
    assert (changed.float().mean(1) < 0.6).all(), "only a box, not the whole image"
    if mode == "const":
        assert (out[out != x] == 0).all()


def test_mixup_trains_with_soft_target_cross_entropy():
    digits = data.load_dataset("digits")
    model = models.create_model("vit_pico_patch2_8", "castling", {"mask_schedule": "fixed"}, seed=0,
                                num_classes=10, in_chans=1, img_size=8, embed_dim=16, depth=1, num_heads=2)
    config = train.TrainConfig(epochs=1, batch_size=33, max_steps=2, device="cpu",
                               augment={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "crop_padding": 1,
                                        "erase_prob": 0.5})
    result = train.fit(model, digits, config, progress=False)
    assert result.ok, result.error
    assert result.steps == 2 and math.isfinite(result.history[0]["train_loss"])
    assert result.config["augment"]["mixup_alpha"] == 0.8   # recorded with the result
    # soft targets: the loss is the soft-target cross-entropy, not the hard-label one
    plain = models.create_model("vit_pico_patch2_8", "castling", {"mask_schedule": "fixed"}, seed=0,
                                num_classes=10, in_chans=1, img_size=8, embed_dim=16, depth=1, num_heads=2)
    hard = train.fit(plain, digits, train.TrainConfig(epochs=1, batch_size=33, max_steps=2, device="cpu"),
                     progress=False)
    assert hard.history[0]["train_loss"] != result.history[0]["train_loss"]
