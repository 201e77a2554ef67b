"""Castling attention: linear-angular + DWConv + an auxiliary masked softmax branch in training.

docs/method.md, "The auxiliary branch and the switch". The branch A = softmax(q k^T / sqrt(d)) on the raw q, k, masked by
M = 1[A > threshold] (no gradient through the comparison), adds S v = (M * A * gate) v before
the output normalisation. It has no parameters, so the official block's state dict loads
unchanged with the branch on or off; ``castle()`` drops it for inference. The branch and the
linear-angular core run the fast paths in ``ops/`` (the plain references beside them).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from attnbench.precision import run_in_float32
from attnbench.variant import preset
from attnbench_variants.linear_angular import LinearAngularAttention, LinearAngularOptions
from attnbench_variants.mask_schedules import BranchState, MaskSchedule, branch_state
from attnbench_variants.ops.castling import castling_attention


@dataclasses.dataclass(frozen=True)
class CastlingOptions(LinearAngularOptions):
    mask_schedule: MaskSchedule = dataclasses.field(
        default="fixed", metadata={"help": "how the auxiliary branch is driven to zero (fixed = official)"})
    threshold: float = dataclasses.field(
        default=0.02, metadata={"help": "mask keeps probabilities above it", "gt": 0, "lt": 1})
    schedule_start: float = dataclasses.field(
        default=0.0, metadata={"help": "progress where the schedule starts", "ge": 0, "le": 1})
    schedule_end: float = dataclasses.field(
        default=0.8, metadata={"help": "progress from which the branch is exactly empty (>= schedule_start)",
                               "ge": 0, "le": 1})
    gate_steps: int = dataclasses.field(default=4, metadata={"help": "gate_step: number of equal drops", "ge": 1})
    l1_weight: float = dataclasses.field(
        default=1e-2, metadata={"help": "l1_ramp: final weight of the L1 penalty on S", "ge": 0})

    def __post_init__(self):
        super().__post_init__()
        # Single-option limits are declared in the field metadata; only the pair is checked here.
        if not self.schedule_start <= self.schedule_end:
            raise ValueError("option 'schedule_start' must be <= 'schedule_end', got "
                             f"{self.schedule_start} and {self.schedule_end}")


class CastlingAttention(LinearAngularAttention):
    """Castling: linear-angular + DWConv + auxiliary masked softmax in training; castle() drops the branch."""

    Options = CastlingOptions

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.progress = 0.0
        self.castled = False
        self._penalty: Optional[torch.Tensor] = None
        self._stats: dict[str, torch.Tensor] = {}

    def set_progress(self, progress: float) -> None:
        self.progress = float(progress)

    def branch(self) -> Optional[BranchState]:
        """The auxiliary branch's state now; None when castled or emptied by the schedule."""
        if self.castled:
            return None
        o = self.options
        return branch_state(o.mask_schedule, self.progress, threshold=o.threshold, start=o.schedule_start,
                            end=o.schedule_end, gate_steps=o.gate_steps, l1_weight=o.l1_weight)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        state = self.branch()
        self._penalty = None
        self._stats = {}
        if state is None:
            return self.core(q, k, v)
        dropout = self.attn_drop if self.training and self.attn_drop.p > 0 else None
        # float32 inside, as the core (see core()), and for the branch: q k^T overflows float16
        # on large tokens, and the mask compares probabilities with the threshold, which half
        # precision's rounding (bfloat16: 8 bits) would move.
        result = run_in_float32(castling_attention, q, k, v, threshold=state.threshold, gate=state.gate,
                                dropout=dropout, need_row_sums=state.l1_weight > 0, **self.core_options(v))
        if result.row_sums is not None:
            self._penalty = state.l1_weight * result.row_sums.mean()  # S >= 0, so L1 = row sum
        self._stats = {"branch_ratio": result.branch_norm / result.prenorm.clamp_min(1e-12),
                       "mask_density": result.density}
        return result.out.to(v.dtype)

    def regularization(self) -> torch.Tensor:
        return self._penalty if self._penalty is not None else super().regularization()

    def diagnostics(self) -> dict[str, float]:
        """Mask density (fraction of kept entries) and |S v| / |y before normalisation|, last forward."""
        if self.branch() is None:
            return {"mask_density": 0.0, "branch_ratio": 0.0}
        return {name: float(value) for name, value in self._stats.items()}

    def castle(self) -> "CastlingAttention":
        self.castled = True
        self._penalty = None
        self._stats = {}
        return self


CastlingNoDWConv = preset(CastlingAttention, "Castling without the DWConv residual (ablation).", residual="none")
CastlingNoAux = preset(CastlingAttention, "Castling without the auxiliary masked softmax branch (ablation).",
                       mask_schedule="none")
CastlingNoNorm = preset(CastlingAttention, "Castling without the output normalisation (ablation).",
                        normalize_output=False)
CastlingFaithful = preset(CastlingAttention, "Castling with the faithful kernel constant and row sum (ablation).",
                          constant="faithful")
