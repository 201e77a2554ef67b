"""Experiment files: YAML -> a validated :class:`Experiment` and its Optuna search space.

An experiment names a model, data, a training budget, seeds, the variant configurations to
compare and/or a search space over variant options, a sampler, objectives and a budget::

    name: ablation
    model: {arch: vit_pico_patch2_8}
    data: {dataset: digits}
    train: {epochs: 8, batch_size: 64}
    seeds: [0, 1, 2]
    variants:                       # each entry is one configuration (label, variant, options)
      - softmax
      - {label: linear-relu, variant: linear, options: {feature_map: relu}}
    search:                         # optional: options swept on every configuration
      schedule_end: {low: 0.3, high: 0.9}     # a range; its type comes from the option
      mask_schedule: [gate_linear, l1_ramp]   # a list: categorical
    sampler: grid                   # grid | tpe | nsga2 | random  (or {type: tpe, seed: 0})
    objectives: [{metric: top1, direction: maximize}]
    budget: {trials: 20, timeout_s: 900}

Every error names the file, the field path and what was expected, in one line.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from attnbench.registry import VariantError, get_variant
from attnbench.variant import OptionSpec, did_you_mean, option_specs, parse_options

__all__ = ["Experiment", "ExperimentError", "ParamSpec", "VariantConfig", "Objective", "MeasureSpec",
           "load_experiment", "parse_experiment", "METRICS", "SAMPLERS"]

#: Objective metrics a trial reports (means over seeds), with their natural direction.
METRICS = {
    "top1": "maximize",               # test top-1 after castling (the inference form), %
    "top1_train_form": "maximize",    # test top-1 with the training form (before castling), %
    "switch_cost": "minimize",        # top1_train_form - top1, points
    "macs": "minimize",               # MACs of one image, inference form
    "params": "minimize",
    "latency_ms": "minimize",
    "peak_memory_mb": "minimize",
}
SAMPLERS = ("grid", "tpe", "nsga2", "random")
CONFIG_PARAM = "config"   # the Optuna parameter that picks one of several listed configurations
DATA_PREFIX = "data."     # search keys naming a data set option (e.g. ``data.img_size``), not a variant's

_TOP_KEYS = ("name", "description", "model", "data", "train", "seeds", "variants", "search", "sampler",
             "objectives", "budget", "pruning", "storage", "measure", "constraints")


class ExperimentError(ValueError):
    """A malformed experiment: ``FILE: field 'a.b': what was expected``."""

    def __init__(self, source: str, field: str, message: str):
        self.source, self.field = source, field
        where = f"field '{field}': " if field else ""
        super().__init__(f"{source}: {where}{message}")


@dataclasses.dataclass(frozen=True)
class VariantConfig:
    """One configuration to compare: a label, a registered variant and its options."""

    label: str
    variant: str
    options: dict[str, Any]
    data_options: dict[str, Any] = dataclasses.field(default_factory=dict)   # swept ``data.*`` values


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """A swept variant option: categorical ``choices`` or a ``low``..``high`` range."""

    name: str
    kind: str                       # "categorical", "int" or "float"
    choices: tuple = ()
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None

    def grid_values(self) -> list:
        """Finite values for the grid sampler (int ranges are expanded by ``step``)."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ValueError(f"option '{self.name}' is a float range; the grid sampler needs a list of values")


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
    train: dict[str, Any]
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

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def grid(self) -> dict[str, list]:
        """The grid sampler's search space: configuration labels and each swept option's values."""
        space = {CONFIG_PARAM: [c.label for c in self.configs]} if len(self.configs) > 1 else {}
        space.update({p.name: p.grid_values() for p in self.search})
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
        label = params.get(CONFIG_PARAM, self.configs[0].label)
        base = next(c for c in self.configs if c.label == label)
        swept = {p.name: params[p.name] for p in self.search if p.name in params}
        options = {k: v for k, v in swept.items() if not k.startswith(DATA_PREFIX)}
        data_options = {k[len(DATA_PREFIX):]: v for k, v in swept.items() if k.startswith(DATA_PREFIX)}
        # Swept data options (resolution, say) make distinct configurations of one variant.
        label = base.label + "".join(f" {k}={v}" for k, v in sorted(data_options.items()))
        return VariantConfig(label, base.variant, {**base.options, **options}, data_options)

    def plan(self) -> list[VariantConfig]:
        """Every configuration of the grid (for ``--dry-run``); [] when the space is continuous."""
        try:
            space = self.grid()
        except ValueError:
            return []
        names = list(space)
        return [self.resolve(dict(zip(names, values))) for values in itertools.product(*space.values())]


# --- reading ---------------------------------------------------------------------------------

class _Reader:
    """Typed access to a YAML mapping that reports errors with the file and field path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, message: str):
        raise ExperimentError(self.source, field, message)

    def mapping(self, value: Any, field: str, allowed: tuple[str, ...]) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(field, f"expected a mapping, got {_show(value)}")
        for key in value:
            if key not in allowed:
                self.fail(_join(field, key), f"unknown field{did_you_mean(key, allowed)} "
                                             f"(expected one of: {', '.join(allowed)})")
        return value

    def entries(self, value: Any, field: str, shorthand: str, allowed: tuple[str, ...]) -> list[tuple[str, dict]]:
        """A non-empty list of mappings as (field path, mapping); a bare string ``s`` stands for
        ``{shorthand: s}`` and a lone item for a list of one."""
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, list) or not value:
            self.fail(field, f"expected a non-empty list, got {_show(value)}")
        out = []
        for i, item in enumerate(value):
            path = f"{field}[{i}]"
            out.append((path, self.mapping({shorthand: item} if isinstance(item, str) else item, path, allowed)))
        return out

    def string(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(field, f"expected a non-empty string, got {_show(value)}")
        return value

    def integer(self, value: Any, field: str, minimum: Optional[int] = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"expected an integer, got {_show(value)}")
        if minimum is not None and value < minimum:
            self.fail(field, f"expected an integer >= {minimum}, got {value}")
        return value

    def number(self, value: Any, field: str, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(field, f"expected a number, got {_show(value)}")
        if positive and not value > 0:
            self.fail(field, f"expected a number > 0, got {value}")
        return float(value)

    def boolean(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, f"expected true or false, got {_show(value)}")
        return value


def _join(field: str, key: Any) -> str:
    return f"{field}.{key}" if field else str(key)


def _show(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def load_experiment(path: Union[str, Path]) -> Experiment:
    """Read and validate an experiment file.

    Raises:
        ExperimentError: the file is missing, not YAML, or malformed (one-line message).
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ExperimentError(source, "", "no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise ExperimentError(source, "", f"cannot read it ({type(err).__name__})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ExperimentError(source, "", f"not valid YAML{where}: {problem}") from None
    return parse_experiment(raw, source, default_name=path.stem)


def parse_experiment(raw: Any, source: str = "<experiment>", default_name: str = "experiment") -> Experiment:
    """Validate an already-parsed experiment mapping (see the module docstring)."""
    r = _Reader(source)
    if raw is None:
        r.fail("", "the file is empty; expected a mapping with at least 'variants'")
    top = r.mapping(raw, "", _TOP_KEYS)
    name = r.string(top.get("name", default_name), "name")
    if any(ch in name for ch in "/\\") or name.startswith("."):
        r.fail("name", f"expected a plain name usable as a folder, got {name!r}")

    arch, model_kwargs = _model(r, top.get("model"))
    dataset, data_root, data_options = _data(r, top.get("data"))
    train = _train(r, top.get("train"))
    seeds = _seeds(r, top.get("seeds", [0]))
    configs = _configs(r, top.get("variants"))
    search = _search(r, top.get("search"), configs, dataset)
    sampler, sampler_seed = _sampler(r, top.get("sampler", "grid"))
    objectives = _objectives(r, top.get("objectives", [{"metric": "top1"}]))
    trials, timeout_s = _budget(r, top.get("budget"))
    pruning = r.boolean(top.get("pruning", True), "pruning")
    storage = top.get("storage")
    if storage is not None:
        storage = r.string(storage, "storage")
    measure = _measure(r, top.get("measure"))
    max_macs = _constraints(r, top.get("constraints"))

    experiment = Experiment(
        name=name, source=source, description=str(top.get("description", "")), arch=arch,
        model_kwargs=model_kwargs, dataset=dataset, data_root=data_root, data_options=data_options,
        train=train, seeds=seeds, configs=configs, search=search, sampler=sampler, sampler_seed=sampler_seed,
        objectives=objectives, trials=trials, timeout_s=timeout_s, pruning=pruning, storage=storage,
        measure=measure, max_macs=max_macs)
    if sampler == "grid":
        try:
            experiment.grid()
        except ValueError as err:
            r.fail("search", f"{err}")
    elif sampler == "nsga2" and not experiment.multi_objective:
        r.fail("sampler", "nsga2 is for several objectives; list at least two under 'objectives' or use tpe")
    if experiment.n_trials() is None and timeout_s is None:
        r.fail("budget", f"sampler '{sampler}' needs 'budget.trials' or 'budget.timeout_s'")
    if experiment.multi_objective and pruning and "pruning" in top:
        r.fail("pruning", "multi-objective studies cannot prune; set 'pruning: false' (use constraints.max_macs)")
    return experiment


def _model(r: _Reader, raw: Any) -> tuple[Optional[str], dict]:
    import timm

    from attnbench import models  # noqa: F401 - registers attnbench's small models with timm

    model = r.mapping(raw, "model", ("arch", "kwargs"))
    arch = model.get("arch")
    if arch is not None:
        arch = r.string(arch, "model.arch")
        known = timm.list_models("vit_*") + timm.list_models("deit_*")
        if arch not in known:
            r.fail("model.arch", f"unknown architecture '{arch}'{did_you_mean(arch, known)} "
                                 f"(a timm vit_*/deit_* name, e.g. vit_pico_patch2_8)")
    kwargs = r.mapping(model.get("kwargs"), "model.kwargs", tuple(model.get("kwargs") or ()))
    for key in ("attn_layer", "pretrained", "num_classes", "in_chans", "img_size"):
        if key in kwargs:
            r.fail(f"model.kwargs.{key}", "is set by attnbench (from the variant and the data); remove it")
    return arch, dict(kwargs)


def _data(r: _Reader, raw: Any) -> tuple[str, Optional[str], dict]:
    from attnbench import data

    spec = r.mapping(raw, "data", ("dataset", "root", "seed", "options"))
    known = data.list_datasets()
    dataset = r.string(spec.get("dataset", "digits"), "data.dataset")
    if dataset not in known:
        r.fail("data.dataset", f"unknown data set '{dataset}'{did_you_mean(dataset, known)} "
                               f"(known: {', '.join(known)})")
    root = spec.get("root")
    if root is not None:
        root = r.string(root, "data.root")
    accepted = data.dataset_options(dataset)
    options = r.mapping(spec.get("options"), "data.options", tuple(accepted))
    options = dict(options)
    options["seed"] = r.integer(spec.get("seed", 0), "data.seed", minimum=0)
    return dataset, root, options


def _train(r: _Reader, raw: Any) -> dict:
    from attnbench.train import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    spec = r.mapping(raw, "train", tuple(fields))
    out = {}
    for key, value in spec.items():
        default = fields[key].default
        if isinstance(default, bool):
            out[key] = r.boolean(value, f"train.{key}")
        elif isinstance(default, int) and not isinstance(value, float):
            out[key] = r.integer(value, f"train.{key}", minimum=0)
        elif isinstance(default, (int, float)):
            out[key] = r.number(value, f"train.{key}")
        elif value is None or isinstance(value, (str, int, float)):
            out[key] = value
        else:
            r.fail(f"train.{key}", f"expected a scalar, got {_show(value)}")
    try:
        TrainConfig(**out)
    except (TypeError, ValueError) as err:
        r.fail("train", str(err))
    return out


def _seeds(r: _Reader, raw: Any) -> tuple[int, ...]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        r.fail("seeds", f"expected a non-empty list of integers, got {_show(raw)}")
    seeds = tuple(r.integer(s, f"seeds[{i}]", minimum=0) for i, s in enumerate(raw))
    if len(set(seeds)) != len(seeds):
        r.fail("seeds", f"expected distinct seeds, got {list(seeds)}")
    return seeds


def _variant_name(r: _Reader, name: Any, field: str) -> str:
    name = r.string(name, field)
    try:
        get_variant(name)
    except VariantError as err:   # unknown names: the closest, the known, and that a plugin may be missing
        r.fail(field, str(err))
    return name


def _configs(r: _Reader, raw: Any) -> tuple[VariantConfig, ...]:
    if raw is None:
        r.fail("variants", "missing; expected a list of variants (names or {label, variant, options})")
    configs = []
    for field, entry in r.entries(raw, "variants", "variant", ("label", "variant", "options")):
        if "variant" not in entry:
            r.fail(f"{field}.variant", "missing; expected a registered variant name")
        variant = _variant_name(r, entry["variant"], f"{field}.variant")
        options = r.mapping(entry.get("options"), f"{field}.options", tuple(entry.get("options") or ()))
        _check_options(r, variant, dict(options), f"{field}.options")
        label = r.string(entry.get("label", variant), f"{field}.label")
        configs.append(VariantConfig(label, variant, dict(options)))
    labels = [c.label for c in configs]
    for label in labels:
        if labels.count(label) > 1:
            r.fail("variants", f"label '{label}' is used twice; give each configuration a distinct 'label'")
    return tuple(configs)


def _check_options(r: _Reader, variant: str, options: dict, field: str) -> None:
    cls = get_variant(variant)
    specs = {s.name: s for s in option_specs(cls)}
    for key in options:
        if key not in specs:
            r.fail(_join(field, key), f"variant '{variant}' has no option '{key}'{did_you_mean(key, specs)} "
                                      f"(options: {', '.join(specs) or 'none'})")
    try:
        parse_options(cls, options)
    except ValueError as err:
        r.fail(field, str(err))


def _data_option_spec(r: _Reader, name: str, field: str, dataset: str) -> OptionSpec:
    from attnbench import data

    option = name[len(DATA_PREFIX):]
    accepted = data.dataset_options(dataset)
    if option not in accepted or option == "seed":
        r.fail(field, f"data set '{dataset}' has no option '{option}'{did_you_mean(option, accepted)} "
                      f"(options: {', '.join(accepted)})")
    default = accepted[option]
    kind = {bool: "bool", int: "int", float: "float"}.get(type(default), "str")
    return OptionSpec(name, kind, default)


def _search(r: _Reader, raw: Any, configs: tuple[VariantConfig, ...], dataset: str) -> tuple[ParamSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        r.fail("search", f"expected a mapping of option name to values or range, got {_show(raw)}")
    params = []
    for name, value in raw.items():
        field = f"search.{name}"
        if name == CONFIG_PARAM:
            r.fail(field, f"'{CONFIG_PARAM}' is reserved; list configurations under 'variants'")
        if name.startswith(DATA_PREFIX):
            params.append(_param(r, name, value, _data_option_spec(r, name, field, dataset), field))
            continue
        specs = []
        for config in configs:
            variant_specs = {s.name: s for s in option_specs(get_variant(config.variant))}
            if name not in variant_specs:
                r.fail(field, f"variant '{config.variant}' has no option '{name}'{did_you_mean(name, variant_specs)}")
            specs.append(variant_specs[name])
        params.append(_param(r, name, value, specs[0], field))
        for config in configs:
            for choice in params[-1].choices:
                try:
                    parse_options(get_variant(config.variant), {**config.options, name: choice})
                except ValueError as err:
                    r.fail(field, str(err))
    return tuple(params)


def _param(r: _Reader, name: str, value: Any, spec: OptionSpec, field: str) -> ParamSpec:
    if isinstance(value, list):
        value = {"choices": value}
    entry = r.mapping(value, field, ("choices", "low", "high", "log", "step"))
    if "choices" in entry:
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            r.fail(f"{field}.choices", f"expected a non-empty list, got {_show(choices)}")
        if set(entry) != {"choices"}:
            r.fail(field, "give either 'choices' or 'low'/'high', not both")
        return ParamSpec(name, "categorical", tuple(choices))
    if spec.kind not in ("int", "float"):
        r.fail(field, f"option '{name}' is {spec.kind}; give a list of values, not a range")
    for key in ("low", "high"):
        if key not in entry:
            r.fail(f"{field}.{key}", "missing; a range needs 'low' and 'high'")
    low, high = r.number(entry["low"], f"{field}.low"), r.number(entry["high"], f"{field}.high")
    if not low < high:
        r.fail(field, f"expected low < high, got {low} and {high}")
    log = r.boolean(entry.get("log", False), f"{field}.log")
    if log and low <= 0:
        r.fail(f"{field}.low", f"a log range needs low > 0, got {low}")
    step = entry.get("step")
    if step is not None:
        step = r.number(step, f"{field}.step", positive=True)
    if spec.kind == "int":
        if low != int(low) or high != int(high):
            r.fail(field, f"option '{name}' is an integer; expected integer bounds")
        return ParamSpec(name, "int", low=int(low), high=int(high), log=log, step=int(step) if step else None)
    return ParamSpec(name, "float", low=low, high=high, log=log, step=step)


def _sampler(r: _Reader, raw: Any) -> tuple[str, int]:
    if isinstance(raw, str):
        raw = {"type": raw}
    spec = r.mapping(raw, "sampler", ("type", "seed"))
    kind = r.string(spec.get("type", "grid"), "sampler.type")
    if kind not in SAMPLERS:
        r.fail("sampler.type", f"unknown sampler '{kind}'{did_you_mean(kind, SAMPLERS)} "
                               f"(expected one of: {', '.join(SAMPLERS)})")
    return kind, r.integer(spec.get("seed", 0), "sampler.seed", minimum=0)


def _objectives(r: _Reader, raw: Any) -> tuple[Objective, ...]:
    out = []
    for field, entry in r.entries(raw, "objectives", "metric", ("metric", "direction")):
        metric = r.string(entry.get("metric"), f"{field}.metric")
        if metric not in METRICS:
            r.fail(f"{field}.metric", f"unknown metric '{metric}'{did_you_mean(metric, METRICS)} "
                                      f"(expected one of: {', '.join(METRICS)})")
        direction = r.string(entry.get("direction", METRICS[metric]), f"{field}.direction")
        if direction not in ("maximize", "minimize"):
            r.fail(f"{field}.direction", f"expected 'maximize' or 'minimize'{did_you_mean(direction, ('maximize', 'minimize'))}")
        out.append(Objective(metric, direction))
    if len({o.metric for o in out}) != len(out):
        r.fail("objectives", "a metric is listed twice")
    return tuple(out)


def _budget(r: _Reader, raw: Any) -> tuple[Optional[int], Optional[float]]:
    spec = r.mapping(raw, "budget", ("trials", "timeout_s"))
    trials = spec.get("trials")
    if trials is not None:
        trials = r.integer(trials, "budget.trials", minimum=1)
    timeout_s = spec.get("timeout_s")
    if timeout_s is not None:
        timeout_s = r.number(timeout_s, "budget.timeout_s", positive=True)
    return trials, timeout_s


def _measure(r: _Reader, raw: Any) -> MeasureSpec:
    fields = {f.name: f.default for f in dataclasses.fields(MeasureSpec)}
    spec = r.mapping(raw, "measure", tuple(fields))
    values = {}
    for key, value in spec.items():
        if isinstance(fields[key], bool):
            values[key] = r.boolean(value, f"measure.{key}")
        else:
            values[key] = r.integer(value, f"measure.{key}", minimum=1)
    return MeasureSpec(**values)


def _constraints(r: _Reader, raw: Any) -> Optional[int]:
    spec = r.mapping(raw, "constraints", ("max_macs",))
    value = spec.get("max_macs")
    return None if value is None else int(r.number(value, "constraints.max_macs", positive=True))
