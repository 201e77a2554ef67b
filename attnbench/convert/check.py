"""What a conversion study can be told before it runs: the teacher builds, its checkpoint exists and
fits, and which of its weights each configuration takes (``--dry-run`` shows the plan)."""
from __future__ import annotations

import torch

from attnbench import checkpoints, models

__all__ = ["check", "key_plan", "plan_lines"]


def _meta_model(arch: str, variant: str, options: dict, kwargs: dict):
    with torch.device("meta"):
        return models.create_model(arch, variant, options, **kwargs)


def check(experiment, arch: str, kwargs: dict) -> list[tuple[str, str]]:
    """(field, problem) of the ``convert`` block: the teacher cannot be built, or its checkpoint
    is missing, unreadable or not exactly the teacher's weights."""
    spec = experiment.convert
    try:
        teacher = _meta_model(arch, spec.teacher_variant, spec.teacher_options, kwargs)
    except Exception as err:  # noqa: BLE001 - one line
        return [("convert.teacher", f"the teacher ({spec.teacher_variant}) cannot be built: {type(err).__name__}: "
                                    f"{' '.join(str(err).split())[:300]}")]
    if spec.teacher_checkpoint is None:
        return []
    field = "convert.teacher.checkpoint"
    try:
        state = checkpoints.read_state_dict(spec.teacher_checkpoint)
    except checkpoints.CheckpointError as err:
        return [(field, str(err))]
    match = checkpoints.match_state(teacher.state_dict(), state)
    # a teacher is used as it is: every weight, the classifier included, with its shape
    for keys, what in ((match.mismatched, "have another shape than the teacher's"),
                       (match.new, "of the teacher are missing from it"), (match.unused, "are not the teacher's")):
        if keys:
            return [(field, f"checkpoint '{spec.teacher_checkpoint}' is not a trained '{arch}' teacher for this "
                            f"data: {len(keys)} weight(s) {what}, e.g. '{keys[0]}'")]
    return []


def key_plan(arch: str, kwargs: dict, teacher_variant: str, teacher_options: dict, variant: str,
             options: dict) -> checkpoints.StateMatch:
    """Which teacher weights a configuration's model takes (built on the meta device: shapes only)."""
    teacher = _meta_model(arch, teacher_variant, teacher_options, kwargs)
    student = _meta_model(arch, variant, options, kwargs)
    return checkpoints.match_state(student.state_dict(), teacher.state_dict())


def _keys_text(keys: tuple[str, ...]) -> str:
    """``4 x dconv.weight`` for one parameter of every block, else the keys."""
    tails = {}
    for key in keys:
        tail = key.split(".attn.", 1)[-1] if ".attn." in key else key
        tails[tail] = tails.get(tail, 0) + 1
    return ", ".join(f"{n} x {tail}" if n > 1 else tail for tail, n in tails.items())


def plan_lines(experiment, arch: str, kwargs: dict, configs) -> list[str]:
    """The conversion plan: the teacher, the stages, and per configuration the weights it takes."""
    spec = experiment.convert
    if spec.teacher_checkpoint is not None:
        teacher = f"teacher: {spec.teacher_variant} from '{spec.teacher_checkpoint}'"
    else:
        recipe = spec.teacher_train
        who = "one a seed" if spec.teacher_per_seed else f"once, seed {experiment.seeds[0]}"
        cap = f" (at most {recipe.max_steps} updates)" if recipe.max_steps else ""
        teacher = (f"teacher: {spec.teacher_variant}, trained {who} ({recipe.epochs} epochs{cap}, batch "
                   f"{recipe.batch_size}, lr {recipe.lr:g}; kept under RESULTS/{experiment.name}/teacher/)")
    lines = [teacher, f"stages: zero-shot, attention transfer {spec.transfer_steps} updates (attention layers), "
                      f"fine-tuning {spec.finetune_steps} updates ({spec.finetune} parameters); validation top-1 "
                      f"every {spec.eval_every} updates; new parameters start at "
                      f"{'zero' if spec.new_parameters == 'zero' else 'the variant initialisation'}"]
    for config in configs:
        match = key_plan(arch, kwargs, spec.teacher_variant, spec.teacher_options, config.variant, config.options)
        new = f"; new: {_keys_text(match.new)}" if match.new else ""
        unused = f"; not taken: {_keys_text(match.unused + match.mismatched)}" if match.unused or match.mismatched \
            else ""
        lines.append(f"  {config.label}: takes {len(match.loaded)} of the teacher's "
                     f"{len(match.loaded) + len(match.unused) + len(match.mismatched)} weights{new}{unused}")
    return lines

