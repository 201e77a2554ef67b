"""Fair tuning: every configuration gets the same number of tuning trainings, on the validation
split only, before its seeds run at the value it chose (the ``tune:`` block of an experiment)."""
from attnbench.tuning.spec import FIELDS, Range, TuneSpec, parse_tune

__all__ = ["FIELDS", "Range", "TuneSpec", "parse_tune"]
