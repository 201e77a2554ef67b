"""The ``convert:`` block of an experiment file: what a conversion study does, validated.

::

    convert:
      teacher: {train: {epochs: 5}}     # or {checkpoint: softmax.safetensors}; per_seed: true for one a seed
      transfer_steps: 300               # attention layers only, MSE to the teacher's layer outputs
      finetune_steps: 300               # the task loss; all parameters, or `finetune: attention`
      eval_every: 50                    # validation top-1 of the recovery curve
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

from attnbench.registry import DEFAULT_VARIANT

if TYPE_CHECKING:
    from attnbench.train import TrainConfig

__all__ = ["ConvertSpec", "FIELDS", "TEACHER_FIELDS", "FINETUNE", "NEW_PARAMETERS", "parse_convert"]

FIELDS = ("teacher", "transfer_steps", "finetune_steps", "eval_every", "finetune", "transfer_lr", "finetune_lr",
          "new_parameters")
TEACHER_FIELDS = ("train", "checkpoint", "variant", "options", "per_seed")
FINETUNE = ("all", "attention")          # which parameters the fine-tuning trains
NEW_PARAMETERS = ("zero", "init")        # how a student's parameters the teacher lacks start


@dataclasses.dataclass(frozen=True)
class ConvertSpec:
    """A validated ``convert:`` block.

    Attributes:
        teacher_variant, teacher_options: the teacher's attention (softmax by default).
        teacher_train: the teacher's TrainConfig (the experiment's ``train`` updated by
            ``teacher.train``); None when it comes from ``teacher_checkpoint``.
        teacher_checkpoint: a local file holding the trained teacher.
        teacher_per_seed: train one teacher a seed (each seed's conversions start from its own);
            otherwise one teacher, trained with the first seed, serves every seed.
        transfer_steps: updates of attention transfer (attention layers only, per-layer MSE).
        finetune_steps: updates of fine-tuning on the task loss.
        eval_every: validation top-1 every this many updates, for the recovery curve.
        finetune: ``all`` parameters, or the ``attention`` layers' only.
        transfer_lr, finetune_lr: peak learning rates of the two stages (None: ``train.lr``).
        new_parameters: ``zero`` (a student's parameters the teacher lacks, e.g. a DWConv, start at
            zero: the term they add starts absent) or ``init`` (the variant's own initialisation).
    """

    teacher_variant: str = DEFAULT_VARIANT
    teacher_options: dict = dataclasses.field(default_factory=dict)
    teacher_train: Optional[TrainConfig] = None
    teacher_checkpoint: Optional[str] = None
    teacher_per_seed: bool = False
    transfer_steps: int = 0
    finetune_steps: int = 0
    eval_every: int = 50
    finetune: str = "all"
    transfer_lr: Optional[float] = None
    finetune_lr: Optional[float] = None
    new_parameters: str = "zero"

    @property
    def total_steps(self) -> int:
        return self.transfer_steps + self.finetune_steps


def parse_convert(r, raw: Any, train: TrainConfig, dataset: str, data_options: dict) -> Optional[ConvertSpec]:
    """The ``convert`` block (None when absent); ``r`` is the experiment's reader (errors name
    the file and the field), ``train`` the experiment's parsed ``train``."""
    from attnbench.checkpoints import SUFFIXES
    from attnbench.experiment.parse import _check_options, _train, _variant_name
    from attnbench.suggest import did_you_mean

    if raw is None:
        return None
    spec = r.mapping(raw, "convert", FIELDS)
    if "teacher" not in spec:
        r.fail("convert.teacher", "missing; expected {train: {...}} (trained here) or {checkpoint: FILE}")
    teacher = r.mapping(spec["teacher"], "convert.teacher", TEACHER_FIELDS)
    if ("train" in teacher) == ("checkpoint" in teacher):
        r.fail("convert.teacher", "give either 'train' (the teacher is trained here) or 'checkpoint' (a trained "
                                  "teacher's file), not both or neither")
    variant = _variant_name(r, teacher.get("variant", DEFAULT_VARIANT), "convert.teacher.variant")
    options = dict(r.mapping(teacher.get("options"), "convert.teacher.options",
                             tuple(teacher.get("options") or ())))
    _check_options(r, variant, options, "convert.teacher.options")
    teacher_train, checkpoint = None, None
    if "train" in teacher:
        overrides = r.mapping(teacher["train"], "convert.teacher.train", tuple(teacher["train"] or ()))
        # the teacher's recipe is the experiment's `train`, updated by its own; checked as a `train` block
        teacher_train = _train(_Prefixed(r, "convert.teacher."), overrides, dataset, data_options, base=train)
    else:
        checkpoint = r.string(teacher["checkpoint"], "convert.teacher.checkpoint")
        if not checkpoint.endswith(SUFFIXES):
            r.fail("convert.teacher.checkpoint", f"expected a file ending in {', '.join(SUFFIXES)}, got {checkpoint!r}")
    per_seed = r.boolean(teacher.get("per_seed", False), "convert.teacher.per_seed")
    if per_seed and checkpoint is not None:
        r.fail("convert.teacher.per_seed", "a teacher from a checkpoint is one teacher; per_seed trains one a seed")
    transfer = r.integer(spec.get("transfer_steps", 0), "convert.transfer_steps", minimum=0)
    finetune_steps = r.integer(spec.get("finetune_steps", 0), "convert.finetune_steps", minimum=0)
    eval_every = r.integer(spec.get("eval_every", 50), "convert.eval_every", minimum=1)
    finetune = r.string(spec.get("finetune", "all"), "convert.finetune")
    if finetune not in FINETUNE:
        r.fail("convert.finetune", f"expected one of {', '.join(FINETUNE)}{did_you_mean(finetune, FINETUNE)}, "
                                   f"got {finetune!r}")
    new = r.string(spec.get("new_parameters", "zero"), "convert.new_parameters")
    if new not in NEW_PARAMETERS:
        r.fail("convert.new_parameters", f"expected one of {', '.join(NEW_PARAMETERS)}"
                                         f"{did_you_mean(new, NEW_PARAMETERS)}, got {new!r}")
    lrs = {}
    for name in ("transfer_lr", "finetune_lr"):
        value = spec.get(name)
        lrs[name] = None if value is None else r.number(value, f"convert.{name}", positive=True)
    return ConvertSpec(variant, options, teacher_train, checkpoint, per_seed, transfer, finetune_steps, eval_every,
                       finetune, lrs["transfer_lr"], lrs["finetune_lr"], new)


class _Prefixed:
    """The experiment's reader with field paths under a prefix (``train.lr`` -> ``convert.teacher.train.lr``)."""

    def __init__(self, reader, prefix: str):
        self._reader, self._prefix = reader, prefix
        self.source = reader.source

    def fail(self, field: str, message: str):
        self._reader.fail(self._prefix + field, message)

    def __getattr__(self, name):
        method = getattr(type(self._reader), name)
        return lambda *args, **kwargs: method(self, *args, **kwargs)
