"""Experiment files: YAML -> a validated :class:`attnbench.experiment.spec.Experiment`.

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
      - {label: la, variant: linear-angular, search: {kernel_size: [3, 9]}}   # swept on this one only
    search:                         # optional: options swept on every configuration
      schedule_end: {low: 0.3, high: 0.9}     # a range; its type comes from the option
      mask_schedule: [gate_linear, l1_ramp]   # a list: categorical
    sampler: grid                   # grid | tpe | nsga2 | random  (or {type: tpe, seed: 0})
    objectives: [{metric: top1, direction: maximize}]
    budget: {trials: 20, timeout_s: 900}
    across:                         # optional: every configuration at every named point
      - {label: main}
      - {label: crop+flip, train: {augment: {crop_padding: 2, hflip: true}}}
      - {label: 2x epochs, train: {epochs: 16}}

Each point of ``across`` overrides the study's ``train``, ``data`` and ``model`` (mappings merged
key by key, other values replaced) and is validated as a whole experiment of its own; an error
that a point's override causes names it (``across[2].train.epochs``).

Every error names the file, the field path and what was expected, in one line. What can only be
checked by building the models and opening the data is checked by :mod:`attnbench.experiment_check`
before a sweep writes anything; docs/experiments.md lists every field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import yaml

from attnbench.fields import FieldKind, field_kinds, kind_of_default
from attnbench.registry import VariantError, get_variant
from attnbench.results.schema import BASELINE, OBJECTIVES
from attnbench.suggest import did_you_mean
from attnbench.variant import OptionSpec, option_specs, parse_options
from attnbench.experiment.spec import (_MEASURE_MAX, _SHOWN_CHARS, _TRAIN_SET_BY_SWEEP, CONFIG_FIELDS, CONFIG_PARAM,
                                       DATA_PREFIX, MAX_SAMPLER_SEED, MAX_SEED, METRICS, MODEL_FIELDS, POINT_FIELDS,
                                       SAMPLERS, SAVE_CHECKPOINT, TOP_LEVEL_FIELDS, Experiment, ExperimentError,
                                       MeasureSpec, Objective, ParamSpec, Point, VariantConfig)

if TYPE_CHECKING:
    from attnbench.data.augment import Augmentation
    from attnbench.train import TrainConfig

__all__ = ["load_experiment", "parse_experiment", "read_yaml", "overrides_field", "point_error"]

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

    def integer(self, value: Any, field: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"expected an integer, got {_show(value)}")
        if minimum is not None and value < minimum:
            self.fail(field, f"expected an integer >= {minimum}, got {_show(value).removeprefix('int ')}")
        if maximum is not None and value > maximum:
            self.fail(field, f"expected an integer <= {maximum:,}, got {_show(value).removeprefix('int ')}")
        return value

    def number(self, value: Any, field: str, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(field, f"expected a number, got {_show(value)}")
        if not math.isfinite(value):
            self.fail(field, f"expected a finite number, got {value}")
        if positive and not value > 0:
            self.fail(field, f"expected a number > 0, got {value}")
        return float(value)

    def boolean(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, f"expected true or false, got {_show(value)}")
        return value

    def typed(self, value: Any, field: str, kind: FieldKind, minimum: Optional[int] = None) -> Any:
        """A value of a typed setting (integers from ``minimum`` up); a choice, or a kind this
        reader does not know, is taken as a single value for its owner's own check, which names
        what it allows."""
        if value is None and kind.optional:
            return None
        if kind.kind == "bool":
            return self.boolean(value, field)
        if kind.kind == "int":
            return self.integer(value, field, minimum=minimum)
        if kind.kind == "float":
            return self.number(value, field)
        if kind.kind == "str":
            return self.string(value, field)
        if value is not None and not isinstance(value, (str, int, float, bool)):
            self.fail(field, f"expected a single value, got {_show(value)}")
        return value


def _join(field: str, key: Any) -> str:
    return f"{field}.{key}" if field else str(key)


def _show(value: Any) -> str:
    """A value echoed in an error: its type and a repr cut to one short line (a container is
    abbreviated as it is rendered, never rendered whole)."""
    if value is None:
        return "nothing"
    if isinstance(value, str):
        shown = repr(value)
        if len(shown) > _SHOWN_CHARS:
            shown = f"{shown[:_SHOWN_CHARS]}... ({len(value):,} characters)"
    else:
        shown = _SHORT_REPR.repr(value)
        if len(shown) > _SHOWN_CHARS:
            shown = f"{shown[:_SHOWN_CHARS]}..."
    return f"{type(value).__name__} {shown}"


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxdict = 3, 4
    short.maxlist = short.maxtuple = short.maxset = 4
    short.maxstring = short.maxother = short.maxlong = _SHOWN_CHARS
    return short


_SHORT_REPR = _short_repr()


def load_experiment(path: Union[str, Path]) -> Experiment:
    """Read and validate an experiment file.

    Raises:
        ExperimentError: the file is missing, not YAML, or malformed (one-line message).
    """
    path = Path(path)
    return parse_experiment(read_yaml(path), str(path), default_name=path.stem)


#: Bounds on an experiment file: far above any real one, far below what takes a parser seconds.
MAX_FILE_BYTES = 4 * 2**20
MAX_DEPTH = 32


def read_yaml(path: Path) -> Any:
    """The YAML document of an experiment file, read safely: at most :data:`MAX_FILE_BYTES`
    (``/dev/zero`` is refused, not read for ever), nested at most :data:`MAX_DEPTH` deep, no
    anchors or aliases (a few hundred bytes of aliases expand to billions of values) and no key
    given twice in one mapping (YAML would keep the last without a word).

    Raises:
        ExperimentError: one line naming the file (and the line and column of the problem).
    """
    source = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        text = data.decode()
    except FileNotFoundError:
        raise ExperimentError(source, "", "no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError, OSError) as err:
        raise ExperimentError(source, "", f"cannot read it ({type(err).__name__})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ExperimentError(source, "", f"larger than {MAX_FILE_BYTES // 2**20} MiB; an experiment file is a "
                                          f"few lines of YAML")
    try:
        return yaml.load(text, Loader=_SafeExperimentLoader)   # a SafeLoader subclass, bounded
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        position = getattr(err, "position", None)   # a reader error: a character YAML does not allow
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else \
            f" at character {position + 1}" if isinstance(position, int) else ""
        problem = getattr(err, "problem", None) or getattr(err, "reason", None) or "invalid YAML"
        raise ExperimentError(source, "", f"not valid YAML{where}: {problem}") from None


class _SafeExperimentLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases, deep nesting and duplicate keys as it composes
    (before anything is expanded)."""

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"an alias (*{event.anchor}) is not accepted: anchors "
                                                          f"and aliases can expand without bound; write the "
                                                          f"value out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:   # an unhashable key: the constructor's own error says so
                    break
                if duplicate:
                    shown = repr(key) if len(repr(key)) <= _SHOWN_CHARS else repr(key)[:_SHOWN_CHARS] + "..."
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {shown} is given twice in one mapping (YAML would keep the "
                                    f"last without a word)", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def parse_experiment(raw: Any, source: str = "<experiment>", default_name: str = "experiment") -> Experiment:
    """Validate an already-parsed experiment mapping (see the module docstring)."""
    r = _Reader(source)
    if raw is None:
        r.fail("", "the file is empty; expected a mapping with at least 'variants'")
    top = r.mapping(raw, "", TOP_LEVEL_FIELDS)
    name = _study_name(r, top.get("name", default_name), "name" in top)

    arch, model_kwargs = _model(r, top.get("model"))
    checkpoint = _model_checkpoint(r, top.get("model"))
    dataset, data_root, data_options = _data(r, top.get("data"))
    train_raw, save_checkpoint = _save_checkpoint(r, top.get("train"))
    train = _train(r, train_raw, dataset, data_options)
    seeds = _seeds(r, top.get("seeds", [0]))
    sampler, sampler_seed = _sampler(r, top.get("sampler", "grid"))
    configs = _configs(r, top.get("variants"), dataset, sampler)
    search = _search(r, top.get("search"), configs, dataset)
    baseline = _baseline(r, top.get("baseline"), configs)
    objectives = _objectives(r, top.get("objectives", [{"metric": "top1"}]))
    trials, timeout_s = _budget(r, top.get("budget"))
    pruning = r.boolean(top.get("pruning", False), "pruning")
    storage = top.get("storage")
    if storage is not None:
        storage = r.string(storage, "storage")
    from attnbench.convert.spec import parse_convert

    convert = parse_convert(r, top.get("convert"), train, dataset, data_options)
    if convert is not None and pruning:
        r.fail("pruning", "a conversion study reports every configuration in full; set 'pruning: false'")
    if convert is not None and checkpoint is not None:
        r.fail("model.checkpoint", "a conversion study starts from its teacher; give the file as "
                                   "'convert.teacher.checkpoint'")
    from attnbench.tuning import parse_tune

    tune = parse_tune(r, top.get("tune"), train, seeds)
    if tune is not None and convert is not None:
        r.fail("tune", "a conversion study has its own stage learning rates (convert.transfer_lr, "
                       "convert.finetune_lr); 'tune' is for studies that train from scratch")
    measure = _measure(r, top.get("measure"))
    _objectives_measured(r, objectives, measure)
    max_macs = _constraints(r, top.get("constraints"))
    description = top.get("description", "")
    if not isinstance(description, (str, int, float)) or isinstance(description, bool):
        r.fail("description", f"expected text, got {_show(description)}")
    description = str(description)

    experiment = Experiment(
        name=name, source=source, description=description, arch=arch,
        model_kwargs=model_kwargs, dataset=dataset, data_root=data_root, data_options=data_options,
        train=train, seeds=seeds, configs=configs, search=search, sampler=sampler, sampler_seed=sampler_seed,
        objectives=objectives, trials=trials, timeout_s=timeout_s, pruning=pruning, storage=storage,
        measure=measure, max_macs=max_macs, baseline=baseline, checkpoint=checkpoint,
        save_checkpoint=save_checkpoint, convert=convert, tune=tune)
    if "across" in top:
        points = _across(r, top["across"], raw, experiment, default_name)
        experiment = dataclasses.replace(experiment, points=points)
    if sampler == "grid":
        try:
            size = experiment.grid_size()
        except ValueError as err:
            r.fail("search", f"{err}")
        if trials is not None and trials > size:
            r.fail("budget.trials", f"the grid has {size} point(s); {trials} trials would repeat some "
                                    f"(leave 'budget.trials' out to run the whole grid once)")
    elif sampler == "nsga2" and not experiment.multi_objective:
        r.fail("sampler", "nsga2 is for several objectives; list at least two under 'objectives' or use tpe")
    if experiment.n_trials() is None and timeout_s is None:
        r.fail("budget", f"sampler '{sampler}' needs 'budget.trials' or 'budget.timeout_s'")
    if experiment.multi_objective and pruning:
        r.fail("pruning", "multi-objective studies cannot prune; set 'pruning: false' (use constraints.max_macs)")
    return experiment


_NAME_MAX_CHARS = 100   # a folder name, with room for the study's files within every file system's limit


def _across(r: _Reader, raw: Any, top: dict, experiment: Experiment, default_name: str) -> tuple[Point, ...]:
    """The points of ``across``: each validated as the whole experiment with its overrides merged in."""
    if experiment.sampler != "grid":
        r.fail("across", f"runs every configuration at every point, which needs 'sampler: grid' (this file "
                         f"has '{experiment.sampler}')")
    if experiment.convert is not None:
        r.fail("across", "a conversion study does not take 'across' (its teacher is trained once for the study)")
    if not isinstance(raw, list) or len(raw) < 2:
        r.fail("across", f"expected a list of at least two points, each {{label: ..., train: {{...}}, data: "
                         f"{{...}}, model: {{...}}}}, got {_show(raw)}")
    base = {k: v for k, v in top.items() if k != "across"}
    points, seen = [], {}
    for i, item in enumerate(raw):
        field = f"across[{i}]"
        entry = r.mapping(item, field, POINT_FIELDS)
        if "label" not in entry:
            r.fail(field, "expected a 'label' naming the point (e.g. {label: no-augment, train: {augment: null}})")
        label = r.string(entry["label"], f"{field}.label")
        if label in seen:
            r.fail(f"{field}.label", f"'{label}' labels {seen[label]} already; each point needs its own label")
        seen[label] = field
        overrides = {k: v for k, v in entry.items() if k != "label"}
        for key, value in overrides.items():
            if not isinstance(value, dict):
                r.fail(f"{field}.{key}", f"expected a mapping of the study's '{key}' fields to override, "
                                         f"got {_show(value)}")
        try:
            at = parse_experiment(_merged(base, overrides), r.source, default_name)
        except ExperimentError as err:
            raise point_error(err, field, label, overrides) from None
        points.append(Point(label, json.loads(json.dumps(overrides, default=str)), at, field))
    return tuple(points)


def _merged(base: Any, override: Any) -> Any:
    """``override`` merged into ``base``: mappings key by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merged(base[k], v) if k in base else v for k, v in override.items()}}
    return override


def overrides_field(overrides: dict, field: str) -> bool:
    """Whether ``field`` (``train.augment.hflip``) is, or lies inside or above, what a point overrides."""
    node: Any = overrides
    for part in field.split("."):
        if not isinstance(node, dict):
            return True    # inside a value the point replaces whole (``augment: null``)
        if part not in node:
            return False
        node = node[part]
    return True


def point_error(err: ExperimentError, field: str, label: str, overrides: dict) -> ExperimentError:
    """An error of the experiment at a point of ``across``, said where the file causes it: at the
    point's own field when the point overrides it, else at the study's field, naming the point."""
    if err.field and not err.field.startswith("--") and overrides_field(overrides, err.field):
        return ExperimentError(err.source, f"{field}.{err.field}", err.message)
    return ExperimentError(err.source, err.field, f"{err.message} (at {field}, point '{label}')")


def _study_name(r: _Reader, raw: Any, given: bool) -> str:
    """The study's name, which is also its folder under the results folder: one plain path
    component (no separator, no leading dot, no control character, not too long), so that
    ``RESULTS/<name>`` is always a folder directly inside RESULTS."""
    where = "" if given else " (taken from the file name; set 'name' to another)"
    name = r.string(raw, "name")
    if any(ch in name for ch in "/\\") or name.startswith("."):
        r.fail("name", f"expected a plain name usable as a folder (no '/' or '\\', not starting with '.'), "
                       f"got {_show(name)}{where}")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        r.fail("name", f"expected a name without control characters (newline, tab, NUL, escape), "
                       f"got {_show(name)}{where}")
    if name != name.strip():
        r.fail("name", f"expected a name without leading or trailing spaces, got {_show(name)}{where}")
    if len(name) > _NAME_MAX_CHARS or len(name.encode()) > 2 * _NAME_MAX_CHARS:
        r.fail("name", f"expected at most {_NAME_MAX_CHARS} characters (it names a folder), got "
                       f"{len(name):,}{where}")
    return name


def _model(r: _Reader, raw: Any) -> tuple[Optional[str], dict]:
    import timm

    from attnbench import models  # noqa: F401 - registers attnbench's small models with timm

    model = r.mapping(raw, "model", MODEL_FIELDS)
    arch = model.get("arch")
    if arch is not None:
        arch = r.string(arch, "model.arch")
        known = timm.list_models("vit_*") + timm.list_models("deit_*")
        if arch not in known:
            r.fail("model.arch", f"unknown architecture '{arch}'{did_you_mean(arch, known)} "
                                 f"(a timm vit_*/deit_* name, e.g. vit_pico_patch2_8)")
    kwargs = r.mapping(model.get("kwargs"), "model.kwargs", tuple(model.get("kwargs") or ()))
    for key in ("attn_layer", "pretrained", "num_classes", "in_chans", "img_size", "device", "dtype"):
        if key in kwargs:
            r.fail(f"model.kwargs.{key}", "is set by attnbench (from the variant, the data and --device); remove it")
    return arch, dict(kwargs)


def _model_checkpoint(r: _Reader, raw: Any) -> Optional[str]:
    """``model.checkpoint``: a local file (whether it exists and fits is checked with the models,
    by :mod:`attnbench.experiment_check`)."""
    value = raw.get("checkpoint") if isinstance(raw, dict) else None
    if value is None:
        return None
    from attnbench.checkpoints import SUFFIXES

    path = r.string(value, "model.checkpoint")
    if not path.endswith(SUFFIXES):
        r.fail("model.checkpoint", f"expected a file ending in {', '.join(SUFFIXES)}, got {path!r}")
    return path


def _save_checkpoint(r: _Reader, raw: Any) -> tuple[Any, bool]:
    """(``train`` without ``save_checkpoint``, its value)."""
    if not isinstance(raw, dict) or SAVE_CHECKPOINT not in raw:
        return raw, False
    rest = {k: v for k, v in raw.items() if k != SAVE_CHECKPOINT}
    return rest, r.boolean(raw[SAVE_CHECKPOINT], f"train.{SAVE_CHECKPOINT}")


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
    accepted = {k: v for k, v in data.dataset_options(dataset).items() if k != "seed"}
    options = dict(r.mapping(spec.get("options"), "data.options", tuple(accepted)))
    for key, value in options.items():
        # the type of the option's declared default; its range is the data set's own check
        r.typed(value, f"data.options.{key}", _data_option_kind(dataset, key))
    options["seed"] = r.integer(spec.get("seed", 0), "data.seed", minimum=0, maximum=MAX_SEED)
    return dataset, root, options


def _train(r: _Reader, raw: Any, dataset: str, data_options: dict, base: Optional[TrainConfig] = None) -> TrainConfig:
    """The ``train`` block as a TrainConfig: ``base`` (TrainConfig's defaults when None) updated by
    the fields given. The resolved augmentation is part of it, so every result row says what was
    (not) applied."""
    from attnbench.train import TrainConfig

    kinds = field_kinds(TrainConfig)
    spec = r.mapping(raw, "train", (*kinds, SAVE_CHECKPOINT))
    values = {}
    for key, value in spec.items():
        field = f"train.{key}"
        if key in _TRAIN_SET_BY_SWEEP:
            r.fail(field, f"is set by attnbench: {_TRAIN_SET_BY_SWEEP[key]}; remove it")
        if key == SAVE_CHECKPOINT:   # reaches here only in a teacher's recipe
            r.fail(field, "is a study setting; give it in the experiment's own 'train'")
        if key == "augment":
            values[key] = _augment(r, value, dataset, data_options)
        else:
            values[key] = r.typed(value, field, kinds[key], minimum=0)
    try:
        return dataclasses.replace(base or TrainConfig(), **values)
    except (TypeError, ValueError) as err:
        message = str(err).removeprefix("TrainConfig: ")
        named = next((key for key in kinds if message.startswith(f"{key} ")), None)
        r.fail(f"train.{named}" if named in spec else "train", message)


def _augment(r: _Reader, raw: Any, dataset: str, data_options: dict) -> Augmentation:
    from attnbench import data
    from attnbench.data.augment import Augmentation

    kinds = field_kinds(Augmentation)
    spec = r.mapping(raw, "train.augment", tuple(kinds))
    values = {key: r.typed(value, f"train.augment.{key}", kinds[key], minimum=0) for key, value in spec.items()}
    try:
        augment = Augmentation(**values)
    except ValueError as err:
        r.fail("train.augment", str(err).removeprefix("augment: "))
    if augment.hflip and not data.flips_preserve_labels(dataset, data_options):
        declare = (f" or, if mirrored images keep their class, set data.options.{data.FLIPS_OPTION}: true"
                   if data.FLIPS_OPTION in data.dataset_options(dataset) else "")
        r.fail("train.augment.hflip", f"data set '{dataset}' does not declare horizontal flips label-preserving "
                                      f"(a mirrored digit is not the same digit); remove hflip{declare}")
    return augment


def _seeds(r: _Reader, raw: Any) -> tuple[int, ...]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        r.fail("seeds", f"expected a non-empty list of integers, got {_show(raw)}")
    seeds = tuple(r.integer(s, f"seeds[{i}]", minimum=0, maximum=MAX_SEED) for i, s in enumerate(raw))
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


def _configs(r: _Reader, raw: Any, dataset: str, sampler: str) -> tuple[VariantConfig, ...]:
    if raw is None:
        r.fail("variants", "missing; expected a list of variants (names or {label, variant, options, search})")
    configs = []
    for field, entry in r.entries(raw, "variants", "variant", CONFIG_FIELDS):
        if "variant" not in entry:
            r.fail(f"{field}.variant", "missing; expected a registered variant name")
        variant = _variant_name(r, entry["variant"], f"{field}.variant")
        options = r.mapping(entry.get("options"), f"{field}.options", tuple(entry.get("options") or ()))
        _check_options(r, variant, dict(options), f"{field}.options")
        label = r.string(entry.get("label", variant), f"{field}.label")
        config = VariantConfig(label, variant, dict(options), field=field)
        own = _search(r, entry.get("search"), (config,), dataset, f"{field}.search")
        if sampler == "grid":
            for p in own:
                if p.kind == "float":
                    r.fail(p.field, f"option '{p.name}' is a float range; the grid sampler needs a list of values")
        configs.append(dataclasses.replace(config, search=own))
    seen: set[str] = set()   # one pass: a file of thousands of configurations is checked in milliseconds
    for config in configs:
        if config.label in seen:
            r.fail("variants", f"label '{config.label}' is used twice; give each configuration a distinct 'label'")
        seen.add(config.label)
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
    accepted = [k for k in data.dataset_options(dataset) if k != "seed"]
    if option not in accepted:
        r.fail(field, f"data set '{dataset}' has no option '{option}'{did_you_mean(option, accepted)} "
                      f"(options: {', '.join(accepted)})")
    default = data.dataset_options(dataset)[option]
    return OptionSpec(name, kind_of_default(default).kind, default)


def _data_option_kind(dataset: str, option: str) -> FieldKind:
    """A data set option is typed by its loader's default (None: any single value)."""
    from attnbench import data

    return kind_of_default(data.dataset_options(dataset)[option])


def _search(r: _Reader, raw: Any, configs: tuple[VariantConfig, ...], dataset: str,
            where: str = "search") -> tuple[ParamSpec, ...]:
    """The options swept on ``configs`` (the study-wide ``search``, or one configuration's own),
    each value checked: every choice, and both ends of a range, must be a valid option value."""
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        r.fail(where, f"expected a mapping of option name to values or range, got {_show(raw)}")
    params = []
    for name, value in raw.items():
        field = f"{where}.{name}"
        if not isinstance(name, str):
            r.fail(field, f"expected an option name, got {_show(name)}")
        if name == CONFIG_PARAM:
            r.fail(field, f"'{CONFIG_PARAM}' is reserved; list configurations under 'variants'")
        if name.startswith(DATA_PREFIX):
            for config in configs:
                if any(p.name == name for p in config.search):
                    r.fail(field, f"'{name}' is also swept in {config.field}.search; sweep it in one place")
            spec = _data_option_spec(r, name, field, dataset)
            param = _param(r, name, value, spec, field)
            for end in param.ends():
                r.typed(end, field, kind_of_default(spec.default))
            params.append(param)
            continue
        spec = None
        for config in configs:
            variant_specs = {s.name: s for s in option_specs(get_variant(config.variant))}
            if name not in variant_specs:
                r.fail(field, f"variant '{config.variant}' has no option '{name}'{did_you_mean(name, variant_specs)}"
                              f"{_per_config_hint(where)}")
            if name in config.options:
                r.fail(field, f"'{name}' is also fixed in {config.field}.options; sweep it or fix it, not both")
            if any(p.name == name for p in config.search):
                r.fail(field, f"'{name}' is also swept in {config.field}.search; sweep it in one place")
            spec = spec or variant_specs[name]
        param = _param(r, name, value, spec, field)
        for config in configs:
            for end in param.ends():
                try:
                    parse_options(get_variant(config.variant), {**config.options, name: end})
                except ValueError as err:
                    r.fail(field, str(err))
        params.append(param)
    return tuple(params)


def _per_config_hint(where: str) -> str:
    if where != "search":
        return ""
    return " (to sweep an option of some configurations only, give it under their own 'search')"


def _baseline(r: _Reader, raw: Any, configs: tuple[VariantConfig, ...]) -> Optional[str]:
    labels = [c.label for c in configs]
    if raw is None:
        return BASELINE if BASELINE in labels else None
    label = r.string(raw, "baseline")
    if label not in labels:
        r.fail("baseline", f"no configuration is labelled '{label}'{did_you_mean(label, labels)} "
                           f"(labels: {', '.join(labels)})")
    return label


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
        for choice in choices:
            if choice is not None and not isinstance(choice, (str, int, float, bool)):
                r.fail(f"{field}.choices", f"expected single values, got {_show(choice)}")
        if len(set(map(repr, choices))) != len(choices):
            r.fail(f"{field}.choices", f"a value is listed twice: {_show(choices)}")
        return ParamSpec(name, "categorical", tuple(choices), field=field)
    if spec.kind not in ("int", "float", "any"):
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
        if log:
            r.fail(field, "give 'log' or 'step', not both (Optuna samples a log range without steps)")
    kind = spec.kind
    if kind == "any":   # an option whose default is None: the bounds say
        kind = "int" if all(isinstance(entry[k], int) for k in ("low", "high")) else "float"
    if kind == "int":
        if low != int(low) or high != int(high) or (step is not None and step != int(step)):
            r.fail(field, f"option '{name}' is an integer; expected integer bounds and step")
        return ParamSpec(name, "int", low=int(low), high=int(high), log=log, step=int(step) if step else None,
                         field=field)
    return ParamSpec(name, "float", low=low, high=high, log=log, step=step, field=field)


def _sampler(r: _Reader, raw: Any) -> tuple[str, int]:
    if isinstance(raw, str):
        raw = {"type": raw}
    spec = r.mapping(raw, "sampler", ("type", "seed"))
    kind = r.string(spec.get("type", "grid"), "sampler.type")
    if kind not in SAMPLERS:
        r.fail("sampler.type", f"unknown sampler '{kind}'{did_you_mean(kind, SAMPLERS)} "
                               f"(expected one of: {', '.join(SAMPLERS)})")
    # each worker's sampler seed is seed x 1000 + its index, and Optuna's samplers take 32 bits
    return kind, r.integer(spec.get("seed", 0), "sampler.seed", minimum=0, maximum=MAX_SAMPLER_SEED)


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


def _objectives_measured(r: _Reader, objectives: tuple[Objective, ...], measure: MeasureSpec) -> None:
    """An objective whose column needs a ``measure`` switch that is off could never be produced."""
    for i, objective in enumerate(objectives):
        switch = OBJECTIVES[objective.metric].measured_by
        if switch is not None and not getattr(measure, switch):
            r.fail(f"objectives[{i}].metric", f"'{objective.metric}' is measured only with 'measure.{switch}: true'")


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
            values[key] = r.integer(value, f"measure.{key}", minimum=1, maximum=_MEASURE_MAX.get(key))
    return MeasureSpec(**values)


def _constraints(r: _Reader, raw: Any) -> Optional[int]:
    spec = r.mapping(raw, "constraints", ("max_macs",))
    value = spec.get("max_macs")
    return None if value is None else int(r.number(value, "constraints.max_macs", positive=True))
