"""Experiment files: YAML -> a validated :class:`Experiment` and its Optuna search space.

The experiment as data and its search-space algebra live in :mod:`attnbench.experiment.spec`;
reading and validating a file in :mod:`attnbench.experiment.parse`. This package is the front door.
"""
from attnbench.experiment.parse import load_experiment, overrides_field, parse_experiment, point_error, read_yaml
from attnbench.experiment.spec import (CONFIG_FIELDS, CONFIG_PARAM, DATA_PREFIX, MAX_SAMPLER_SEED, MAX_SEED,
                                       METRICS, MODEL_FIELDS, POINT_FIELDS, POINT_PARAM, SAMPLERS, SAVE_CHECKPOINT,
                                       TOP_LEVEL_FIELDS, Experiment, ExperimentError, MeasureSpec, Objective,
                                       ParamSpec, Point, VariantConfig)

__all__ = ["Experiment", "ExperimentError", "ParamSpec", "VariantConfig", "Objective", "MeasureSpec", "Point",
           "load_experiment", "parse_experiment", "read_yaml", "overrides_field", "point_error", "METRICS",
           "SAMPLERS", "TOP_LEVEL_FIELDS", "CONFIG_FIELDS", "MODEL_FIELDS", "POINT_FIELDS", "CONFIG_PARAM",
           "POINT_PARAM", "DATA_PREFIX", "MAX_SEED", "MAX_SAMPLER_SEED", "SAVE_CHECKPOINT"]
