"""Castling's auxiliary branch, its mask schedules and the switch."""
from __future__ import annotations

import math

import pytest
import torch

import references
from attnbench.registry import build_attention
from attnbench_variants.mask_schedules import MASK_SCHEDULES, branch_state

EMPTYING = [s for s in MASK_SCHEDULES if s not in ("none", "fixed")]
DIM, HEADS, TOKENS = 24, 3, 17


def _layer(**options):
    torch.manual_seed(0)
    return build_attention("castling", DIM, HEADS, **options)


def _x():
    return torch.randn(2, TOKENS, DIM, generator=torch.Generator().manual_seed(3))


def test_branch_on_equals_the_spec_formula():
    layer = _layer(mask_schedule="fixed", threshold=0.05).double()
    x = _x().double()
    expected = references.linear_angular(layer, x, branch=(0.05, 1.0))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    without_branch = references.linear_angular(layer, x, branch=None)
    assert (layer(x) - without_branch).abs().max() > 1e-3, "the branch must change the output"


@pytest.mark.parametrize("schedule", EMPTYING)
@pytest.mark.parametrize("end", [0.5, 1.0])
def test_after_the_schedule_ends_castling_changes_nothing(schedule, end):
    layer = _layer(mask_schedule=schedule, schedule_end=end).eval()
    x = _x()
    layer.set_progress(end)
    assert layer.branch() is None
    before = layer(x)
    assert torch.equal(before, layer.castle()(x))


@pytest.mark.parametrize("schedule", EMPTYING)
def test_the_branch_is_active_before_the_end(schedule):
    layer = _layer(mask_schedule=schedule, schedule_end=0.8, threshold=0.01).eval()
    layer.set_progress(0.1)
    x = _x()
    assert layer.branch() is not None
    before = layer(x)
    assert layer.diagnostics()["mask_density"] > 0
    assert not torch.equal(before, layer.castle()(x))


def test_fixed_schedule_never_empties_and_castling_costs_something():
    layer = _layer(mask_schedule="fixed").eval()
    layer.set_progress(1.0)
    x = _x()
    assert layer.branch() is not None
    assert not torch.equal(layer(x), layer.castle()(x))


def test_no_aux_preset_is_linear_angular_with_dwconv():
    torch.manual_seed(0)
    no_aux = build_attention("castling-no-aux", DIM, HEADS)
    plain = build_attention("linear-angular", DIM, HEADS, residual="dwconv")
    plain.load_state_dict(no_aux.state_dict())
    x = _x()
    assert torch.equal(no_aux(x), plain(x))


def test_schedules_decrease_to_zero():
    common = dict(threshold=0.02, start=0.2, end=0.8, gate_steps=4, l1_weight=0.5)
    grid = [i / 100 for i in range(101)]
    for kind in ("gate_linear", "gate_cosine", "gate_step"):
        gates = [s.gate if (s := branch_state(kind, p, **common)) else 0.0 for p in grid]
        assert gates[0] == 1.0 and gates[-1] == 0.0
        assert all(a >= b for a, b in zip(gates, gates[1:])), kind
    assert branch_state("gate_step", 0.2 + 0.6 * 0.3, **common).gate == 0.75
    assert math.isclose(branch_state("gate_cosine", 0.5, **common).gate, 0.5)
    thresholds = [s.threshold for p in grid if (s := branch_state("threshold_ramp", p, **common))]
    assert thresholds[0] == 0.02 and all(a <= b for a, b in zip(thresholds, thresholds[1:]))
    assert branch_state("l1_ramp", 0.5, **common).l1_weight == pytest.approx(0.25)
    for kind in EMPTYING:
        assert branch_state(kind, 0.8, **common) is None
    assert branch_state("fixed", 1.0, **common).threshold == 0.02
    assert branch_state("none", 0.0, **common) is None


def test_l1_penalty_is_the_weighted_row_sum_of_s():
    layer = _layer(mask_schedule="l1_ramp", l1_weight=0.4, schedule_end=1.0, threshold=0.05).double()
    layer.set_progress(0.5)
    x = _x().double()
    layer(x)
    q, k, _ = layer.qkv(x).reshape(2, TOKENS, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS), dim=-1)
    s = probs * (probs > 0.05)
    torch.testing.assert_close(layer.regularization(), 0.4 * 0.5 * s.sum(-1).mean())
    layer.regularization().backward()
    assert layer.qkv.weight.grad.abs().sum() > 0, "the penalty must shape the shared qkv weights"


def test_diagnostics_report_density_and_ratio():
    layer = _layer(mask_schedule="fixed")
    layer(_x())
    stats = layer.diagnostics()
    assert 0 < stats["mask_density"] <= 1 and 0 < stats["branch_ratio"] < 10
    layer.castle()
    assert layer.diagnostics() == {"mask_density": 0.0, "branch_ratio": 0.0}
