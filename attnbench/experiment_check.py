"""Refuse before you run: everything about an experiment that can be known without training.

:func:`load_experiment` checks what the file says on its own (fields, types, option values).
:func:`check_experiment` then checks what only the models and the data can tell, before a sweep
writes any file or folder: the run options (the device is there, the results folder can be a
folder), every data set the experiment would open (paths, files, option values), the image size
against the model's patch size (a remainder would be cropped without a word), and every
configuration built once on the meta device (no memory, no compute): each listed one, each with
every swept value at the ends of its range or each of its choices, and for the grid sampler
every point of the grid. With ``across``, all of this at every point (a problem a point's
override causes is named at that point's field). Every problem is one line, ``FILE: field 'a.b':
...``, and all of them are reported together (:class:`ExperimentRefused`).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

from attnbench.experiment import (DATA_PREFIX, Experiment, ExperimentError, ParamSpec, VariantConfig,
                                  overrides_field, point_error)
from attnbench.paths import folder_problem
from attnbench.suggest import did_you_mean

__all__ = ["ExperimentRefused", "CheckedExperiment", "check_experiment", "data_loader", "check_device",
           "patch_problem"]

_BUILD_PROBE = "softmax"   # a built-in variant: if it cannot be built, the model settings are at fault


class ExperimentRefused(ValueError):
    """An experiment that cannot run: one :class:`ExperimentError` per problem, one line each."""

    def __init__(self, problems: list[ExperimentError]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclasses.dataclass(frozen=True)
class CheckedExperiment:
    """An experiment that passed :func:`check_experiment`, with what the check resolved."""

    experiment: Experiment
    device: str                                 # "cpu", "cuda" or "cuda:N"; never "auto"
    data: Callable[[dict[str, Any]], Any]       # a trial's swept data options -> DataSplits (cached)
    point_data: dict[str, Callable[[dict[str, Any]], Any]] = dataclasses.field(default_factory=dict)  # across

    def data_at(self, point: Optional[str]) -> Callable[[dict[str, Any]], Any]:
        """The data loader of the point of ``across`` labelled ``point`` (the study's for None)."""
        return self.data if point is None else self.point_data[point]


def data_loader(experiment: Experiment) -> Callable[[dict[str, Any]], Any]:
    """Splits for the experiment's data with a trial's swept ``data.*`` options, loaded once each.

    Raises ``attnbench.data.DataError`` (or another error of the data set's loader) for bad paths
    or options; :func:`check_experiment` turns those into one line each.
    """
    from attnbench import data

    @functools.lru_cache(maxsize=4)
    def load(frozen: tuple) -> Any:
        return data.load_dataset(experiment.dataset, root=experiment.data_root,
                                 **{**experiment.data_options, **dict(frozen)})

    return lambda overrides: load(tuple(sorted(overrides.items())))


def check_device(device: str) -> tuple[str, Optional[str]]:
    """(the device a sweep runs on, a problem or None): ``auto`` as :func:`attnbench.train.resolve_device`
    reads it (CUDA when present, else CPU); an explicit device is checked to exist."""
    import torch

    from attnbench.train import resolve_device

    if device == "auto":
        return resolve_device("auto").type, None
    if device == "cpu":
        return device, None
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        return device, f"unknown device '{device}'; expected cpu, cuda, cuda:N or auto"
    if not torch.cuda.is_available():
        return device, (f"CUDA is not available here (torch {torch.__version__}"
                        f"{', built without CUDA' if torch.version.cuda is None else ', no GPU visible'}); "
                        f"use --device cpu or auto")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        return device, f"there is no GPU {index}; this machine has {torch.cuda.device_count()}"
    return device, None


def check_experiment(experiment: Experiment, *, device: str = "auto",
                     results_dir: Optional[Path] = None) -> CheckedExperiment:
    """Check everything an experiment needs before anything is written (see the module docstring).

    Args:
        experiment: a parsed experiment (:func:`attnbench.experiment.load_experiment`).
        device: the run's ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        results_dir: the run's ``--results`` folder, which must be (or become) a folder.

    Raises:
        ExperimentRefused: every problem found, one line each.
    """
    check = _Check(experiment)
    resolved, problem = check_device(device)
    if problem:
        check.problem("--device", problem)
    if results_dir is not None:
        check.results_folder(Path(results_dir))
    loader = data_loader(experiment)
    point_data = {}
    if experiment.points:
        point_data = {p.label: data_loader(p.experiment) for p in experiment.points}
        check.problems += _point_problems(experiment, point_data)
    elif check.data_and_models(loader):
        check.configurations(loader)
        check.conversion()
    if check.problems:
        raise ExperimentRefused(check.problems)
    return CheckedExperiment(experiment, resolved, loader, point_data)


def _point_problems(experiment: Experiment, loaders: dict[str, Callable]) -> list[ExperimentError]:
    """The models and data checked at every point of ``across``. A problem found at every point
    alike, in a field no point overrides, is the study's own and said once; any other names where
    the file causes it (:func:`attnbench.experiment.point_error`)."""
    found = []
    for point in experiment.points:
        check = _Check(point.experiment)
        if check.data_and_models(loaders[point.label]):
            check.configurations(loaders[point.label])
        found.append((point, check.problems))
    everywhere = set.intersection(*(set(map(str, problems)) for _, problems in found))
    out: list[ExperimentError] = []
    for point, problems in found:
        for problem in problems:
            shared = str(problem) in everywhere and not any(
                overrides_field(p.overrides, problem.field) for p in experiment.points)
            said = problem if shared else point_error(problem, point.field, point.label, point.overrides)
            if str(said) not in map(str, out):
                out.append(said)
    return out


@dataclasses.dataclass(frozen=True)
class _DataFacts:
    """What a model needs from one data set: classes, channels, image size, and the architecture."""

    num_classes: int
    in_chans: int
    img_size: int
    arch: str   # the experiment's, else attnbench's small ViT that fits the image size

    def model_kwargs(self) -> dict[str, int]:
        return dict(num_classes=self.num_classes, in_chans=self.in_chans, img_size=self.img_size)


@dataclasses.dataclass(frozen=True)
class _Probe:
    """One configuration to build, and the field of the file that asked for it."""

    config: VariantConfig
    field: str

    @property
    def key(self) -> str:
        c = self.config
        return json.dumps([c.variant, c.options, c.data_options], sort_keys=True, default=str)


class _Check:
    def __init__(self, experiment: Experiment):
        self.e = experiment
        self.problems: list[ExperimentError] = []
        self.data_facts: dict[str, _DataFacts] = {}   # swept data options (JSON) -> what the model needs

    def problem(self, field: str, message: str) -> None:
        error = ExperimentError(self.e.source, field, message)
        if str(error) not in map(str, self.problems):
            self.problems.append(error)

    # --- run options ------------------------------------------------------------------------

    def results_folder(self, results: Path) -> None:
        problem = folder_problem(results / self.e.name / "trials", "for the results")
        if problem:
            self.problem("--results", problem)

    # --- data and the model settings ---------------------------------------------------------

    def data_and_models(self, loader) -> bool:
        """Open the base data set and build the model with its settings; False if either fails
        (checking every configuration would then repeat the same problem)."""
        facts = self.open_data(loader, {}, None)
        if facts is None:
            return False
        return self.model_settings(facts)

    def open_data(self, loader, data_options: dict[str, Any], param: Optional[ParamSpec]) -> Optional["_DataFacts"]:
        """What the model needs from the data with ``data_options``, or None (a problem)."""
        key = json.dumps(data_options, sort_keys=True, default=str)
        if key in self.data_facts:
            return self.data_facts[key]
        from attnbench.data import DataError

        try:
            splits = loader(data_options)
            if splits.img_size < 1:
                raise DataError(f"the image size must be a positive number of pixels, got {splits.img_size}")
            splits.train[0]   # preprocess one image: a size or option the loader accepted lazily fails here
        except Exception as err:  # noqa: BLE001 - any loader error is one line about the data
            text = str(err) if isinstance(err, DataError) else f"{type(err).__name__}: {err}"
            self.problem(self._data_field(text, data_options, param), _one_line(text))
            return None
        from attnbench.train import default_arch

        facts = _DataFacts(splits.num_classes, splits.in_chans, splits.img_size,
                           self.e.arch or default_arch(splits))
        self.data_facts[key] = facts
        return facts

    def _data_field(self, message: str, data_options: dict[str, Any], param: Optional[ParamSpec]) -> str:
        if param is not None:
            return param.field
        if self.e.data_root is not None and self.e.data_root in message:
            return "data.root"
        given = [k for k in self.e.data_options if k != "seed"]
        named = [k for k in given if re.search(rf"\b{re.escape(k)}\b", message)]
        if not named and len(given) == 1:   # the loader failed on the one option the file sets
            named = given
        if "image size" in message and "img_size" in given:
            named = ["img_size"]
        return f"data.options.{named[0]}" if named else ("data.options" if given else "data")

    def model_settings(self, facts) -> bool:
        """The architecture and ``model.kwargs`` build a model for the data (with a built-in
        variant), and the image size is a whole number of patches."""
        import timm
        import torch
        from timm.models import build_model_with_cfg

        from attnbench import models

        arch = facts.arch
        data_kwargs = facts.model_kwargs()
        try:
            with torch.device("meta"):
                plain = models.create_model(arch, _BUILD_PROBE, {}, **data_kwargs)
        except Exception as err:  # noqa: BLE001 - reported in one line
            self.problem("model.arch" if self.e.arch else "data",
                         f"timm cannot build '{arch}' for this data: {type(err).__name__}: {_one_line(str(err))}")
            return False
        accepted = _keywords(type(plain))
        if accepted is not None:   # and what timm's builders take before the class sees the rest
            accepted += _parameter_names(timm.create_model) + _parameter_names(build_model_with_cfg)
            for key in self.e.model_kwargs:
                if key not in accepted:
                    self.problem(f"model.kwargs.{key}", f"'{arch}' has no keyword '{key}'{did_you_mean(key, accepted)}")
            if self.problems:
                return False
        if self.e.model_kwargs:
            try:
                with torch.device("meta"):
                    models.create_model(arch, _BUILD_PROBE, {}, **data_kwargs, **self.e.model_kwargs)
            except Exception as err:  # noqa: BLE001
                self.problem("model.kwargs", f"timm cannot build '{arch}' with these keywords: "
                                             f"{type(err).__name__}: {_one_line(str(err))}")
                return False
        return self.patches(plain, arch, facts.img_size, None)

    def patches(self, model, arch: str, img_size: int, param: Optional[ParamSpec]) -> bool:
        """The image is a whole number of patches: timm would crop the remainder silently."""
        problem = patch_problem(model, arch, img_size)
        if problem is None:
            return True
        where = (param.field if param is not None else "data.options.img_size"
                 if "img_size" in self.e.data_options else "model.arch")
        self.problem(where, problem)
        return False

    # --- every configuration ----------------------------------------------------------------

    def configurations(self, loader) -> None:
        probes = self.probes()
        seen: set[str] = set()
        for probe in probes:
            if probe.key in seen:
                continue
            seen.add(probe.key)
            self.build(loader, probe)
        if self.e.sampler == "grid" and not self.problems:
            for config in self.e.plan():   # every point of the grid: swept values together
                probe = _Probe(config, config.field)
                if probe.key not in seen:
                    seen.add(probe.key)
                    self.build(loader, probe)

    def probes(self) -> list[_Probe]:
        """Each listed configuration, then each swept value alone at its ends or choices."""
        out = []
        for config in self.e.configs:
            base = VariantConfig(config.label, config.variant, dict(config.options), field=config.field)
            out.append(_Probe(base, f"{config.field}.options" if config.options else config.field))
            for param in (*self.e.search, *config.search):
                for value in param.ends():
                    if param.name.startswith(DATA_PREFIX):
                        changed = dataclasses.replace(base, data_options={param.name[len(DATA_PREFIX):]: value})
                    else:
                        changed = dataclasses.replace(base, options={**base.options, param.name: value})
                    out.append(_Probe(changed, param.field))
        return out

    def build(self, loader, probe: _Probe) -> None:
        import torch

        from attnbench import models

        param = self._param_at(probe.field)
        facts = self.open_data(loader, probe.config.data_options, param)
        if facts is None:
            return
        arch = facts.arch
        kwargs = {**facts.model_kwargs(), **self.e.model_kwargs}
        config = probe.config
        shape = (1, facts.in_chans, facts.img_size, facts.img_size)
        error = None
        for device in ("meta", "cpu"):   # the meta device first; an op without a meta kernel: CPU
            try:   # the caller's random state stays as it was (a CPU build draws initial weights)
                with torch.random.fork_rng(devices=[]), torch.device(device), torch.no_grad():
                    model = models.create_model(arch, config.variant, config.options, **kwargs).eval()
                    if not self.patches(model, arch, facts.img_size, param):
                        return
                    model(torch.zeros(shape))   # shapes: a token grid a variant cannot take fails here
                self.checkpoint_fits(model, config)
                return
            except Exception as err:  # noqa: BLE001 - reported in one line (the CPU's error, if both fail)
                error = err
        self.problem(probe.field, f"configuration '{config.label}' ({config.variant}, options "
                                  f"{json.dumps(config.options, sort_keys=True, default=str)}) cannot be built "
                                  f"and run: {type(error).__name__}: {_one_line(str(error))}")

    # --- a conversion study's teacher ----------------------------------------------------------

    def conversion(self) -> None:
        if self.e.convert is None:
            return
        from attnbench.convert.check import check

        facts = self.facts()
        for field, message in check(self.e, facts.arch, {**facts.model_kwargs(), **self.e.model_kwargs}):
            self.problem(field, message)

    def facts(self) -> "_DataFacts":
        """What the model needs from the experiment's data (after :meth:`data_and_models`)."""
        return self.data_facts[json.dumps({}, sort_keys=True, default=str)]

    # --- a checkpoint the models start from ----------------------------------------------------

    def checkpoint_state(self) -> Optional[dict]:
        """The state dict of ``model.checkpoint`` (read once), or None (none given, or a problem)."""
        if self.e.checkpoint is None:
            return None
        if not hasattr(self, "_checkpoint"):
            from attnbench.checkpoints import CheckpointError, read_state_dict

            try:
                self._checkpoint = read_state_dict(self.e.checkpoint)
            except CheckpointError as err:
                self.problem("model.checkpoint", str(err))
                self._checkpoint = None
        return self._checkpoint

    def checkpoint_fits(self, model, config: VariantConfig) -> None:
        from attnbench import models

        state = self.checkpoint_state()
        if state is None:
            return
        problem = models.checkpoint_fit_problem(model, state)
        if problem:
            # the same words for every configuration it misfits: one line
            self.problem("model.checkpoint", f"checkpoint '{self.e.checkpoint}' does not fit '{model_name(model)}'"
                                             f": {problem}")

    def _param_at(self, field: str) -> Optional[ParamSpec]:
        for param in (*self.e.search, *(p for c in self.e.configs for p in c.search)):
            if param.field == field:
                return param
        return None


def patch_problem(model, arch: str, img_size: int) -> Optional[str]:
    """Why ``img_size`` is not a whole number of ``model``'s patches (timm would drop the
    remainder without a word), or None."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return None
    side = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    if img_size % side == 0 and img_size >= side:
        return None
    lower, upper = img_size // side * side, (img_size // side + 1) * side
    sizes = f"{lower} or {upper}" if lower else f"{upper}"
    return (f"image size {img_size} is not a multiple of the patch size {side} of '{arch}': "
            f"{img_size % side} row(s) and column(s) of pixels would be dropped "
            f"(use image size {sizes}, or a model with another patch size)")


def model_name(model) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def _keywords(cls: type) -> Optional[list[str]]:
    """The keywords a class's constructor takes (following ``**kwargs`` passed on to its base
    classes), or None if it takes any."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        try:
            parameters = list(inspect.signature(vars(klass)["__init__"]).parameters.values())
        except (TypeError, ValueError):
            return None
        names += [p.name for p in parameters[1:] if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                               inspect.Parameter.KEYWORD_ONLY)]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return names
    return None


def _parameter_names(function: Callable) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds]


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return " ".join(lines)[:500] if lines else "(no message)"
