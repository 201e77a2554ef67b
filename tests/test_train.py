"""attnbench.train: the training loop, the switch, failure reporting and determinism."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from attnbench import data, models, registry, train
from attnbench.variant import AttentionVariant
from test_data import make_cifar_folder, make_image_folder
from test_idx import make_idx_folder

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_model(splits, variant="softmax", options=None, seed=0):
    arch = "vit_pico_patch2_8" if splits.img_size == 8 else "vit_pico_patch4_32"
    return models.create_model(arch, variant, options, seed=seed, num_classes=splits.num_classes,
                               in_chans=splits.in_chans, img_size=splits.img_size, **TINY)


def short(**kw):
    return train.TrainConfig(**{"epochs": 1, "batch_size": 32, "lr": 3e-3, "device": "cpu", **kw})


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits", seed=0)


@pytest.mark.parametrize("name,kwargs", [
    ("digits", {}),
    ("pathfinder", {"num_samples": 200}),
    ("marks", {"num_samples": 200}),
    ("imagefolder", {"img_size": 8}),
    ("imagefolder", {"img_size": 8, "in_memory": False}),
    ("cifar10", {"img_size": 8}),
    ("mnist", {"img_size": 8}),
])
def test_one_short_epoch_on_each_data_set(name, kwargs, tmp_path):
    root = None
    if name == "imagefolder":
        root = make_image_folder(tmp_path / "imgs")
    elif name == "cifar10":
        root = make_cifar_folder(tmp_path)
    elif name == "mnist":
        root = make_idx_folder(tmp_path / "mnist")[0]
    splits = data.load_dataset(name, root=root, **kwargs)
    model = tiny_model(splits, "castling", {"mask_schedule": "fixed"})
    result = train.fit(model, splits, short(max_steps=6), progress=False)
    assert result.ok, result.error
    assert result.checkpoint == "best_val" and result.steps == min(6, math.ceil(len(splits.train) / 32))
    assert 0.0 <= result.test_top1 <= 100.0 and 0.0 <= result.test_top1_castled <= 100.0
    assert result.switch_cost == pytest.approx(result.test_top1 - result.test_top1_castled)
    assert len(result.history) == 1 and result.history[0]["val_top1"] >= 0
    assert result.diagnostics and {"mask_density", "branch_ratio", "layer", "step"} <= set(result.diagnostics[0])
    assert all(layer.castled for _, layer in models.variant_layers(model))   # ends in the inference form


def test_digits_learns_well_above_chance(digits):
    model = tiny_model(digits, "linear-angular")
    result = train.fit(model, digits, short(epochs=3, batch_size=64), progress=False)
    assert result.ok and result.test_top1 > 50.0          # chance is 10%
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_same_seed_same_metrics(digits):
    runs = [train.fit(tiny_model(digits, "castling", {"mask_schedule": "gate_cosine"}), digits,
                      short(max_steps=8, log_every=2), progress=False) for _ in range(2)]
    timing = {"train_time_s": 0, "train_cpu_s": 0, "wall_time_s": 0}
    assert runs[0].summary() | timing == runs[1].summary() | timing
    assert runs[0].history[0] | {"time_s": 0} == runs[1].history[0] | {"time_s": 0}
    assert runs[0].diagnostics == runs[1].diagnostics and len(runs[0].diagnostics) == 4 * 2  # 4 logs x 2 layers


def test_a_schedule_that_empties_the_branch_switches_for_free(digits):
    model = tiny_model(digits, "castling", {"mask_schedule": "gate_linear", "schedule_end": 0.5})
    result = train.fit(model, digits, short(epochs=2, batch_size=128), progress=False)
    assert result.ok
    assert result.switch_cost == 0.0 and result.switch_flips == 0.0
    assert result.mask_density == 0.0
    densities = [(r["progress"], r["mask_density"]) for r in result.diagnostics]
    assert densities[0][1] > 0                    # epoch 0 ran with the branch on
    assert densities[-1] == (pytest.approx(1 - 1 / 20), 0.0)   # 10 steps an epoch, branch gone


def test_regularization_enters_the_loss(digits):
    model = tiny_model(digits, "castling", {"mask_schedule": "l1_ramp", "l1_weight": 0.5})
    result = train.fit(model, digits, short(max_steps=4), progress=False)
    assert result.ok and result.history[0]["train_reg"] > 0


def test_nan_loss_is_reported_as_failed(digits):
    broken = dataclasses.replace(digits, train=data.ImageTensorDataset(
        digits.train.images.clone(), digits.train.labels, digits.mean, digits.std, 8))
    broken.train.images[7, 0, 3, 3] = float("nan")
    result = train.fit(tiny_model(digits), broken, short(batch_size=1024), progress=False)
    assert result.status == "failed" and "NaN loss at step 0" in result.error
    assert math.isnan(result.test_top1)
    with pytest.raises(train.TrainingDiverged, match="NaN loss"):
        result.raise_for_status()


def test_last_checkpoint_time_budget_and_callback(digits):
    seen = []
    result = train.fit(tiny_model(digits), digits, short(epochs=3, checkpoint="last", time_budget_s=0.0),
                       progress=False, callback=seen.append)
    assert result.ok and result.stopped == "time_budget" and result.steps == 1
    assert result.checkpoint == "last" and seen == result.history


def test_progress_bar_runs(digits):
    result = train.fit(tiny_model(digits), digits, short(max_steps=2), progress=True)
    assert result.ok


# --- no wasted test pass: castling that changes nothing is not evaluated twice -------------------

class _NoopOverride(AttentionVariant):
    """Overrides castle() but changes nothing in it."""

    def attend(self, q, k, v, attn_mask):
        return v

    def core_macs(self, num_tokens):
        return 0

    def castle(self):
        return self


class _FlagOverride(_NoopOverride):
    """castle() flips an attribute that forward reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = 1.0

    def attend(self, q, k, v, attn_mask):
        return v * self.scale

    def castle(self):
        self.scale = 0.5
        return self


class _WeightOverride(_NoopOverride):
    """castle() folds a factor into the projection weights, in place."""

    def castle(self):
        with torch.no_grad():
            self.proj.weight.mul_(0.5)
        return self


class _SwapOverride(_NoopOverride):
    """castle() replaces a sub-module by one of another type that computes the same."""

    def castle(self):
        self.norm = torch.nn.Sequential()
        return self


@pytest.mark.parametrize("name", sorted(registry.list_variants()))
def test_castle_changes_is_false_exactly_for_variants_without_a_train_only_branch(name):
    model = models.create_model("vit_pico_patch2_8", name, num_classes=10, in_chans=1, img_size=8, **TINY)
    layers = models.variant_layers(model)
    own_castle = type(layers[0][1]).castle is not AttentionVariant.castle
    assert models.castle_changes(model) is own_castle    # Castling and its presets flip `castled`
    assert models.castle_changes(model) is False          # castling again changes nothing


@pytest.mark.parametrize("cls, changes", [(_NoopOverride, False), (_FlagOverride, True), (_WeightOverride, True),
                                          (_SwapOverride, True)])
def test_castle_changes_compares_state_structure_and_attributes(cls, changes):
    model = torch.nn.Sequential(cls(dim=8, num_heads=2), cls(dim=8, num_heads=2))
    assert models.castle_changes(model) is changes


@pytest.fixture
def counted_evaluate(monkeypatch):
    calls = []
    real = train.evaluate

    def counting(model, ds, **kw):
        calls.append(len(ds))
        return real(model, ds, **kw)

    monkeypatch.setattr(train, "evaluate", counting)
    return calls


@pytest.mark.parametrize("variant, options, test_passes", [
    ("softmax", None, 1), ("linear-angular", None, 1), ("castling", {"mask_schedule": "fixed"}, 2)])
def test_the_test_split_is_evaluated_twice_only_when_castling_changes_something(digits, counted_evaluate, variant,
                                                                                options, test_passes):
    result = train.fit(tiny_model(digits, variant, options), digits, short(epochs=2, batch_size=256, num_threads=1), progress=False)
    assert result.ok and result.epochs_run == 2
    n_val, n_test = len(digits.val), len(digits.test)
    assert n_val != n_test
    assert counted_evaluate.count(n_test) == test_passes
    assert counted_evaluate.count(n_val) == 2 + (test_passes - 1)   # once per epoch, again after castling


@pytest.mark.parametrize("variant", ["softmax", "linear-angular"])
def test_reused_figures_equal_a_second_evaluation(digits, monkeypatch, variant):
    config = short(epochs=2, batch_size=256, num_threads=1)
    reused = train.fit(tiny_model(digits, variant), digits, config, progress=False)
    monkeypatch.setattr(models, "castle_changes", lambda model: models.castle(model) is not None)   # always True
    evaluated = train.fit(tiny_model(digits, variant), digits, config, progress=False)
    fields = ("test_top1", "test_top1_castled", "val_top1", "val_top1_castled", "switch_cost", "switch_flips")
    assert [getattr(reused, f) for f in fields] == [getattr(evaluated, f) for f in fields]
    assert reused.switch_cost == 0.0 and reused.switch_flips == 0.0
    assert reused.test_top1_castled == reused.test_top1 and reused.val_top1_castled == reused.val_top1
