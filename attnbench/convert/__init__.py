"""Conversion studies: swap each variant into a trained teacher and measure what it recovers.

An experiment with a ``convert:`` block (:mod:`attnbench.convert.spec`) trains (or reads) a
teacher (:mod:`attnbench.convert.teacher`) and converts it into every configuration, seed by
seed (:mod:`attnbench.convert.run`): top-1 zero-shot, after attention transfer and after
fine-tuning, with the recovery curve between. docs/experiments.md describes the block.
"""
from attnbench.convert.run import ConvertOutcome, attention_mse, convert_student, load_teacher_weights, transfer
from attnbench.convert.spec import ConvertSpec, parse_convert
from attnbench.convert.teacher import Teacher, get_teacher, teacher_seed

__all__ = ["ConvertSpec", "parse_convert", "Teacher", "get_teacher", "teacher_seed", "ConvertOutcome",
           "convert_student", "load_teacher_weights", "attention_mse", "transfer", "convert_seed"]


def convert_seed(ctx, config, seed: int, student) -> ConvertOutcome:
    """A sweep trial's conversion of one seed (``ctx``: :class:`attnbench.sweep.trial.TrialContext`)."""
    from attnbench.sweep.trial import model_kwargs

    e = ctx.experiment
    teacher = get_teacher(e, ctx.results, ctx.splits, ctx.arch, model_kwargs(ctx), ctx.device, seed)
    return convert_student(teacher, student, ctx.splits, e.convert, e.train, seed, ctx.device)
