"""The experiment as data: a validated :class:`Experiment` (its configurations, search space,
points of ``across``) and the algebra of its Optuna search space. :mod:`attnbench.experiment.parse`
builds one from a YAML file."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from typing import TYPE_CHECKING, Any, Optional

from attnbench.results.schema import OBJECTIVES

if TYPE_CHECKING:
    from attnbench.train import TrainConfig

__all__ = ["Experiment", "ExperimentError", "ParamSpec", "VariantConfig", "Objective", "MeasureSpec", "Point",
           "METRICS", "SAMPLERS", "TOP_LEVEL_FIELDS", "CONFIG_FIELDS", "MODEL_FIELDS", "POINT_FIELDS", "CONFIG_PARAM",
           "POINT_PARAM", "DATA_PREFIX", "MAX_SEED", "MAX_SAMPLER_SEED", "SAVE_CHECKPOINT"]

#: Objective metrics a trial reports (means over seeds), with their natural direction: the
#: result columns that may be objectives (attnbench.results.schema.OBJECTIVES).
METRICS = {name: objective.direction for name, objective in OBJECTIVES.items()}
SAMPLERS = ("grid", "tpe", "nsga2", "random")
CONFIG_PARAM = "config"   # the Optuna parameter that picks one of several listed configurations
DATA_PREFIX = "data."     # search keys naming a data set option (e.g. ``data.img_size``), not a variant's

MAX_SEED = 2**32 - 1                     # seeds reach numpy and torch generators, which take 32 bits
MAX_SAMPLER_SEED = (2**32 - 1) // 1000 - 1   # a worker's sampler seed is seed x 1000 + index (index < 1000)
#: Upper bounds of ``measure`` integers: far above use, far below an allocation of hundreds of GB.
_MEASURE_MAX = {"batch_size": 4096, "repeats": 10_000, "threads": 1024}
#: The top-level fields of an experiment file (docs/experiments.md describes each).
TOP_LEVEL_FIELDS = ("name", "description", "model", "data", "train", "seeds", "variants", "baseline", "search",
                    "sampler", "objectives", "budget", "pruning", "storage", "measure", "constraints", "convert",
                    "across", "tune")
CONFIG_FIELDS = ("label", "variant", "options", "search")   # the fields of one entry under 'variants'
MODEL_FIELDS = ("arch", "kwargs", "checkpoint")
POINT_FIELDS = ("label", "train", "data", "model")   # the fields of one entry under 'across'
POINT_PARAM = "point"     # the Optuna (grid) parameter that picks the point of 'across' a trial runs at
SAVE_CHECKPOINT = "save_checkpoint"   # train.save_checkpoint: not a TrainConfig field (the sweep saves)
#: TrainConfig fields a sweep sets itself, per seed and per worker.
_TRAIN_SET_BY_SWEEP = {"seed": "the sweep trains once per entry of 'seeds'",
                       "device": "the device is chosen on the command line (--device)"}
#: Experiment fields that do not decide a trial's outcome (a resume may change them).
_NOT_DECISIVE = ("name", "source", "description", "trials", "timeout_s", "storage")
_SHOWN_CHARS = 80   # a value echoed in an error is cut here: one line, even for a file of garbage


class ExperimentError(ValueError):
    """A malformed experiment: ``FILE: field 'a.b': what was expected`` (``FILE: option '--x': ...``
    for a command-line option the experiment cannot run with)."""

    def __init__(self, source: str, field: str, message: str):
        self.source, self.field, self.message = source, field, message
        where = "" if not field else f"option '{field}': " if field.startswith("--") else f"field '{field}': "
        super().__init__(f"{source}: {where}{message}")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """A swept option: categorical ``choices`` or a ``low``..``high`` range.

    ``name`` is the option (``schedule_end``, or ``data.img_size`` for a data set option);
    ``field`` is where the file declares it (``search.schedule_end``), for error messages.
    """

    name: str
    kind: str                       # "categorical", "int" or "float"
    choices: tuple = ()
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    field: str = dataclasses.field(default="", compare=False)

    def grid_values(self) -> list:
        """Finite values for the grid sampler (int ranges are expanded by ``step``)."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ValueError(f"option '{self.name}' is a float range; the grid sampler needs a list of values")

    def ends(self) -> list:
        """The values a check must try: every choice, or both ends of the range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.low) + (int(self.high) - int(self.low)) // int(self.step or 1)
                    * int(self.step or 1)]
        return [self.low, self.high]


@dataclasses.dataclass(frozen=True)
class VariantConfig:
    """One configuration to compare: a label, a registered variant and its options.

    ``search`` holds the options swept on this configuration alone (its own ``search`` in the
    file); a configuration resolved for a trial has them applied and ``search`` empty.
    """

    label: str
    variant: str
    options: dict[str, Any]
    data_options: dict[str, Any] = dataclasses.field(default_factory=dict)   # swept ``data.*`` values
    search: tuple[ParamSpec, ...] = ()
    field: str = dataclasses.field(default="", compare=False)   # e.g. ``variants[1]``


@dataclasses.dataclass(frozen=True)
class Objective:
    metric: str
    direction: str


@dataclasses.dataclass(frozen=True)
class MeasureSpec:
    """What each trial measures besides accuracy; latency on the castled model."""

    latency: bool = True
    threads: int = 2
    batch_size: int = 8
    repeats: int = 20
    memory: bool = True


@dataclasses.dataclass(frozen=True)
class Point:
    """One named point of ``across``: what it overrides, and the whole experiment as it runs there."""

    label: str
    overrides: dict[str, Any]          # {"train": {...}, "data": {...}, "model": {...}} as written
    experiment: "Experiment" = dataclasses.field(compare=False, repr=False)
    field: str = dataclasses.field(default="", compare=False)   # e.g. ``across[1]``

    def describe(self) -> str:
        """The overrides as dotted ``key=value`` pairs ("the study's settings" when none)."""
        pairs = [f"{key}={json.dumps(value, sort_keys=True, default=str)}"
                 for key, value in _dotted(self.overrides)]
        return ", ".join(pairs) if pairs else "the study's settings"


def _dotted(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A validated experiment file."""

    name: str
    source: str
    description: str
    arch: Optional[str]            # None: attnbench's small ViT that fits the data
    model_kwargs: dict[str, Any]
    dataset: str
    data_root: Optional[str]
    data_options: dict[str, Any]   # the data set's options, and ``seed`` of the split
    train: TrainConfig             # the recipe; the sweep sets each training's seed and device
    seeds: tuple[int, ...]
    configs: tuple[VariantConfig, ...]
    search: tuple[ParamSpec, ...]
    sampler: str
    sampler_seed: int
    objectives: tuple[Objective, ...]
    trials: Optional[int]
    timeout_s: Optional[float]
    pruning: bool
    storage: Optional[str]
    measure: MeasureSpec
    max_macs: Optional[int]
    baseline: Optional[str] = None   # the label of the configuration never pruned
    checkpoint: Optional[str] = None  # model.checkpoint: a local file every trial's model starts from
    save_checkpoint: bool = False     # train.save_checkpoint: keep each seed's evaluated weights
    convert: Optional[Any] = None     # a conversion study's attnbench.convert.ConvertSpec
    points: tuple[Point, ...] = ()    # across: every configuration runs at every point
    tune: Optional[Any] = None        # an attnbench.tuning.TuneSpec: each configuration's recipe tuned alike

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def config_choices(self) -> list[str]:
        """The values of the ``config`` parameter: the listed labels, and for the grid sampler one
        entry per value of each configuration's own search (``hydra num_features=8``)."""
        if self.sampler != "grid":
            return [c.label for c in self.configs]
        return list(self._grid_configs())

    def own_params(self, label: str) -> list[tuple[str, ParamSpec]]:
        """(Optuna parameter name, spec) of a listed configuration's own search, sampled after the
        configuration is picked (``hydra/num_features``); none for the grid, which lists them."""
        if self.sampler == "grid":
            return []
        config = self._config(label)
        return [(f"{config.label}/{p.name}", p) for p in config.search]

    def grid(self) -> dict[str, list]:
        """The grid sampler's search space: configuration choices and each swept option's values."""
        choices = self.config_choices()
        space = {CONFIG_PARAM: choices} if len(choices) > 1 else {}
        space.update({p.name: p.grid_values() for p in self.search})
        if self.points:
            space[POINT_PARAM] = [p.label for p in self.points]
        return space

    def grid_size(self) -> int:
        return math.prod(len(values) for values in self.grid().values())

    def n_trials(self) -> Optional[int]:
        """Trials the study should finish: the budget, else the whole grid, else None (time limit)."""
        if self.trials is not None:
            return self.trials
        return self.grid_size() if self.sampler == "grid" else None

    def resolve(self, params: dict[str, Any]) -> VariantConfig:
        """The configuration a trial's parameters pick, with swept options applied."""
        choice = params.get(CONFIG_PARAM, self.config_choices()[0])
        grid = self._grid_configs() if self.sampler == "grid" else {}
        if choice in grid:
            base, own = grid[choice]
        else:
            base = self._config(choice)
            own = {p.name: params[name] for name, p in self.own_params(base.label) if name in params}
        swept = {**{p.name: params[p.name] for p in self.search if p.name in params}, **own}
        options = {k: v for k, v in swept.items() if not k.startswith(DATA_PREFIX)}
        data_options = {k[len(DATA_PREFIX):]: v for k, v in swept.items() if k.startswith(DATA_PREFIX)}
        # Swept data options (resolution, say) make distinct configurations of one variant; swept
        # variant options are told apart by the options themselves, as the report does.
        label = base.label + "".join(f" {k}={v}" for k, v in sorted(data_options.items()))
        return VariantConfig(label, base.variant, {**base.options, **options}, data_options, field=base.field)

    def plan(self) -> list[VariantConfig]:
        """Every configuration of the grid (for ``--dry-run``), at one point of ``across``; [] when
        the space is continuous."""
        try:
            space = {k: v for k, v in self.grid().items() if k != POINT_PARAM}
        except ValueError:
            return []
        names = list(space)
        return [self.resolve(dict(zip(names, values))) for values in itertools.product(*space.values())]

    def trial_plan(self) -> list[tuple[Optional["Point"], VariantConfig]]:
        """(point, configuration) of every trial the grid holds: every configuration at every point
        of ``across`` (point None without it); [] when the space is continuous."""
        points = self.points or (None,)
        return [(point, config) for point in points for config in self.at(point and point.label).plan()]

    def point_of(self, params: dict[str, Any]) -> Optional[str]:
        """The label of the point of ``across`` a trial's parameters pick (None without ``across``)."""
        return params.get(POINT_PARAM, self.points[0].label) if self.points else None

    def at(self, point: Optional[str]) -> "Experiment":
        """The experiment as it runs at the point labelled ``point`` (itself without ``across``)."""
        if not self.points:
            return self
        for p in self.points:
            if p.label == point:
                return p.experiment
        raise ValueError(f"no point is labelled '{point}' under 'across' in {self.source} (a trial of an earlier "
                         f"version of the file?)")

    def point_index(self, point: Optional[str]) -> Optional[int]:
        """The position of the point labelled ``point`` under ``across`` (None without it)."""
        labels = [p.label for p in self.points]
        return labels.index(point) if point in labels else None

    def base_label(self, params: dict[str, Any]) -> str:
        """The label, as listed under ``variants``, of the configuration a trial's parameters pick."""
        choice = params.get(CONFIG_PARAM, self.config_choices()[0])
        grid = self._grid_configs() if self.sampler == "grid" else {}
        return grid[choice][0].label if choice in grid else self._config(choice).label

    def decisive(self) -> dict[str, Any]:
        """Everything that decides a trial's outcome, as plain JSON values: every field but the
        name, the file's path and description, the budget and where the study is stored (a field
        added to the experiment is decisive unless listed here)."""
        decisive = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_DECISIVE}
        # a point is decided by what it overrides (its experiment follows from that and the rest)
        decisive["points"] = [{"label": p.label, "overrides": p.overrides} for p in self.points]
        return json.loads(json.dumps(decisive, sort_keys=True, default=str))

    def fingerprint(self) -> str:
        """A short hash of :meth:`decisive`: a failed trial from another fingerprint failed under a
        file since changed, so a sweep runs it again."""
        text = json.dumps(self.decisive(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _config(self, label: str) -> VariantConfig:
        for config in self.configs:
            if config.label == label:
                return config
        raise ValueError(f"no configuration is labelled '{label}' in {self.source} (a trial of an earlier "
                         f"version of the file?)")

    def _grid_configs(self) -> dict[str, tuple[VariantConfig, dict[str, Any]]]:
        """Grid choice -> (listed configuration, values of its own search)."""
        out = {}
        for config in self.configs:
            names = [p.name for p in config.search]
            for values in itertools.product(*(p.grid_values() for p in config.search)):
                own = dict(zip(names, values))
                choice = config.label + "".join(f" {_option_name(k)}={v}" for k, v in own.items())
                out[choice] = (config, own)
        return out


def _option_name(name: str) -> str:
    return name[len(DATA_PREFIX):] if name.startswith(DATA_PREFIX) else name
