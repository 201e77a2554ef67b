"""One trial: suggest a configuration, build, count, train every seed, castle, measure, store its rows.

Who owns the result file: a trial's rows are one file named after its key, published only while
the trial is still this worker's (RUNNING in the storage), under the study's lock. A worker that
stalled past the grace period has had its trial failed and queued again under that same lock, so
it finds the trial gone and writes nothing (:class:`TrialTakenOver`); the re-run's file stands.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from attnbench import convert, kernels, measure, models, precision, provenance, registry
from attnbench.experiment import CONFIG_PARAM, POINT_PARAM, Experiment, ParamSpec, VariantConfig
from attnbench.experiment_check import CheckedExperiment
from attnbench.results import schema, store
from attnbench.sweep.signals import SigintGuard
from attnbench.sweep.storage import study_lock
from attnbench.sweep.study import ERROR_ATTR, EXPERIMENT_ATTR, INTERRUPTED_ATTR, trial_by_number, trial_key
from attnbench.train import TrainConfig, TrainResult, default_arch, fit
from attnbench.tuning import search as tuning


CHECKPOINTS_DIR = "checkpoints"   # under results/<study>/: train.save_checkpoint's files


class TrialFailed(Exception):
    """A trial that failed for a reason worth recording (diverged, out of budget, crashed)."""


class TrialTakenOver(Exception):
    """This worker's trial was failed and queued again by another worker (it missed heartbeats for
    the grace period); the re-run owns the result file, so this worker stores nothing."""


@dataclasses.dataclass
class TrialContext:
    experiment: Experiment
    results: Path                 # results/<study>
    data: Callable[[dict], Any]   # data set options swept by the trial -> splits (cached)
    device: str
    sampler_seed: int
    worker: str
    environment: dict[str, Any]
    storage_url: str = ""         # the study's storage, whose lock guards publishing the result file
    splits: Any = None            # this trial's splits
    point_data: dict[str, Callable[[dict], Any]] = dataclasses.field(default_factory=dict)   # across: per point
    point: Optional[str] = None   # the point of 'across' this trial runs at (experiment is then that point's)
    point_index: Optional[int] = None
    tuned: dict[str, Any] = dataclasses.field(default_factory=dict)   # tune: the tuning's row columns
    signals: SigintGuard = dataclasses.field(default_factory=SigintGuard)   # where a stop signal may cut in

    def at_point(self, study: Experiment, point: Optional[str]) -> "TrialContext":
        """This context at a point of the study's ``across`` (itself without one)."""
        if point is None:
            return self
        return dataclasses.replace(self, experiment=study.at(point), data=self.point_data[point], point=point,
                                   point_index=study.point_index(point))

    @property
    def arch(self) -> str:
        return self.experiment.arch or default_arch(self.splits)


def _suggest(trial: optuna.Trial, experiment: Experiment) -> dict[str, Any]:
    """The trial's parameters: the configuration, the study-wide search, then the picked
    configuration's own search (conditional: only trials of that configuration sample it)."""
    params = {}
    choices = experiment.config_choices()
    if len(choices) > 1:
        params[CONFIG_PARAM] = trial.suggest_categorical(CONFIG_PARAM, choices)
    if experiment.points:
        params[POINT_PARAM] = trial.suggest_categorical(POINT_PARAM, [p.label for p in experiment.points])
    for p in experiment.search:
        params[p.name] = _suggest_one(trial, p.name, p)
    for name, p in experiment.own_params(experiment.base_label(params)):
        params[name] = _suggest_one(trial, name, p)
    return params


def _suggest_one(trial: optuna.Trial, name: str, p: ParamSpec) -> Any:
    if p.kind == "categorical":
        return trial.suggest_categorical(name, list(p.choices))
    if p.kind == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)


def train_config_of(ctx: TrialContext, seed: int) -> TrainConfig:
    """The TrainConfig a seed of this trial trains with: the recipe at the trial's point (tuned,
    where the study tunes), the seed, the sweep's device."""
    return dataclasses.replace(ctx.experiment.train, seed=seed, device=ctx.device)


def model_kwargs(ctx: TrialContext) -> dict[str, Any]:
    s = ctx.splits
    return {**s.model_kwargs(), **ctx.experiment.model_kwargs}


def _build(ctx: TrialContext, config: VariantConfig, seed: int):
    return models.create_model(ctx.arch, config.variant, config.options, seed=seed, **model_kwargs(ctx))


def _build_from(ctx: TrialContext, config: VariantConfig, seed: int):
    """A seed's model, from ``model.checkpoint`` when the study starts from one."""
    model = _build(ctx, config, seed)
    if ctx.experiment.checkpoint is not None:   # checked to fit before the sweep began
        models.load_checkpoint(model, ctx.experiment.checkpoint)
    return model


def _input_shape(ctx: TrialContext) -> tuple[int, int, int]:
    return (ctx.splits.in_chans, ctx.splits.img_size, ctx.splits.img_size)


def _costs(ctx: TrialContext, config: VariantConfig) -> dict[str, Any]:
    """MACs and parameters of the inference form, counted before any training."""
    model = models.castle(_build(ctx, config, seed=0))
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    attention = sum(layer.macs(tokens) for _, layer in models.variant_layers(model))
    return {"macs": measure.count_macs(model, _input_shape(ctx)), "attention_macs": attention,
            "params": measure.count_params(model), "num_tokens": tokens, "arch": ctx.arch}


def _speed(ctx: TrialContext, config: VariantConfig, model) -> dict[str, Any]:
    """Latency and memory of the inference form, as switched on under ``measure``, and the kernels that ran."""
    spec = ctx.experiment.measure
    # Measured in the precision the model was trained in (float32 unless train.precision says otherwise).
    trained_in = train_config_of(ctx, 0).precision
    out: dict[str, Any] = {}
    if spec.latency:
        import torch
        x = torch.randn(spec.batch_size, *_input_shape(ctx), device=ctx.device)
        lat = measure.time_latency(precision.at_precision(model.eval(), trained_in, ctx.device), x,
                                   threads=spec.threads, repeats=spec.repeats, device=ctx.device)
        out.update(latency_median_ms=lat.median_ms, latency_iqr_ms=lat.iqr_ms, measure_batch=spec.batch_size,
                   samples_per_s=lat.samples_per_s)
    if spec.memory:
        build = functools.partial(_castled_model, ctx.arch, config.variant, config.options, trained_in, ctx.device,
                                  **model_kwargs(ctx))
        mem = measure.peak_memory(build, (spec.batch_size, *_input_shape(ctx)), device=ctx.device,
                                  threads=spec.threads)
        # The forward's own peak; the process peak is mostly the interpreter and torch itself.
        out.update(forward_memory_mb=mem.forward_bytes / 2**20, process_peak_memory_mb=mem.peak_bytes / 2**20,
                   memory_method=mem.method, measure_batch=spec.batch_size)
    # Asked again after measuring: compiling may have fallen back while timing.
    out["kernel_implementation"] = kernels.implementation_of(registry.get_variant(config.variant))
    return out


def _castled_model(arch: str, variant: str, options: dict, precision_name: str, device: str, **model_kwargs):
    """Module-level (picklable) builder of the inference form at a precision, for the memory child process."""
    return precision.at_precision(models.castle(models.create_model(arch, variant, options, **model_kwargs)),
                                  precision_name, device)


def _row(ctx: TrialContext, trial: optuna.Trial, key: int, config: VariantConfig, seed: int,
         costs: dict, result: Optional[TrainResult], status: str, error: Optional[str], wall: float,
         conversion: Optional["convert.ConvertOutcome"] = None) -> dict[str, Any]:
    """One (trial, seed) row with its provenance (columns: :mod:`attnbench.results.schema`)."""
    e = ctx.experiment
    s = ctx.splits
    train_config = train_config_of(ctx, seed)
    row = {
        "kind": schema.TRIAL, "created_at": datetime.datetime.now(datetime.timezone.utc),
        "study": e.name, "trial": key, "optuna_trial": trial.number, "seed": seed, "label": config.label,
        "point": ctx.point, "point_index": ctx.point_index,
        **provenance.variant_columns(config.variant, config.options),
        "params_json": json.dumps(trial.params, sort_keys=True, default=str),
        "precision": getattr(train_config, "precision", "float32"),
        "train_config": json.dumps(dataclasses.asdict(train_config), sort_keys=True, default=str),
        "arch": ctx.arch, "model_kwargs": json.dumps(e.model_kwargs, sort_keys=True, default=str),
        "dataset": s.name, "data_root": e.data_root, "data_options": json.dumps(s.options, sort_keys=True, default=str),
        "data_seed": s.seed, "num_classes": s.num_classes, "in_chans": s.in_chans, "img_size": s.img_size,
        "n_train": len(s.train), "n_val": len(s.val), "n_test": len(s.test),
        "sampler": e.sampler, "sampler_seed": ctx.sampler_seed, "worker": ctx.worker,
        "status": status, "error": error, "wall_time_s": wall, "init_checkpoint": e.checkpoint,
        **costs, **ctx.environment, **ctx.tuned,
    }
    if result is not None:
        row.update(_result_columns(result))
    if conversion is not None:
        row.update(conversion.columns)
    return schema.check_row(row)


def _tuned_columns(spec, tuned: "tuning.Tuned") -> dict[str, Any]:
    return {"tuned_lr": tuned.values["lr"], "tuned_weight_decay": tuned.values.get("weight_decay"),
            "tuning_seed": spec.seed, "tuning_trials": json.dumps(tuned.trials)}


def save_seed_checkpoint(ctx: TrialContext, key: int, seed: int, model) -> str:
    """Write a seed's evaluated weights under the study's folder; the path relative to it."""
    from attnbench import checkpoints

    relative = f"{CHECKPOINTS_DIR}/trial-{key:05d}-seed-{seed}{checkpoints.default_suffix()}"
    checkpoints.save_state_dict(model.state_dict(), ctx.results / relative)
    return relative


def _result_columns(result: TrainResult) -> dict[str, Any]:
    summary = result.summary()
    curve = [{k: d[k] for k in ("progress", "layer", "mask_density", "branch_ratio") if k in d}
             for d in result.diagnostics if "mask_density" in d]
    return {
        "top1": result.test_top1_castled, "top1_train_form": result.test_top1, "switch_cost": result.switch_cost,
        "switch_flips": result.switch_flips, "best_val_top1": result.val_top1,
        "best_val_top1_castled": result.val_top1_castled, "checkpoint": result.checkpoint,
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "steps": result.steps,
        "still_improving": result.still_improving,
        **{f"curve_{name}": values for name, values in result.curves().items()},
        "train_time_s": result.train_time_s, "stopped": result.stopped,
        "mask_density_end": result.mask_density, "branch_ratio_end": result.branch_ratio,
        "mask_density_curve": json.dumps(curve) if curve else None,
        "train_device": summary["device"], "train_threads": summary["num_threads"],
    }


def run_trial(ctx: TrialContext, trial: optuna.Trial) -> Any:
    """The Optuna objective: returns the objectives' means over seeds.

    Stores one row per seed that ran (complete, failed or pruned), once; an interrupted trial
    stores nothing (it runs again in full).

    Raises:
        optuna.TrialPruned: the first seed was pruned (never the baseline configuration's).
        TrialFailed: the trial failed for a reason of its own, recorded on the trial.
        TrialTakenOver: another worker took the trial over; nothing was stored.
    """
    e = ctx.experiment   # the study; ``at`` below is the experiment at the trial's point of 'across'
    # First: which worker runs it (host:pid), for watching a study; a trial naming none is an orphan.
    trial.set_user_attr("worker", ctx.worker)
    key = trial_key(trial_by_number(trial.study, trial.number))
    try:
        params = _suggest(trial, e)
        ctx = ctx.at_point(e, e.point_of(params))
        at = ctx.experiment
        config = at.resolve(params)
        ctx = dataclasses.replace(ctx, splits=ctx.data(config.data_options))
    except optuna.exceptions.OptunaError:
        raise   # the trial is no longer this worker's: the loop finds out
    except Exception as err:  # a failure of this trial (say, a trial of an earlier version of the file)
        message = f"{type(err).__name__}: {err}"
        trial.set_user_attr(ERROR_ATTR, message)
        raise TrialFailed(message) from err
    trial.set_user_attr("label", config.label)
    if ctx.point is not None:
        trial.set_user_attr("point", ctx.point)
    trial.set_user_attr(EXPERIMENT_ATTR, e.fingerprint())
    prunable = e.base_label(params) != e.baseline   # the baseline is never pruned: every Δ needs it
    rows: list[dict] = []
    seed: Optional[int] = None   # the seed being trained, while one is
    started = time.perf_counter()
    try:
        # Only this computing is cut at once by a stop signal; every storage call is made outside it
        # or in a held region (attnbench.sweep.signals says why).
        with ctx.signals.work():
            costs = _costs(ctx, config)
            if e.max_macs is not None and costs["macs"] > e.max_macs:
                raise TrialFailed(f"{costs['macs']:,} MACs exceed constraints.max_macs {e.max_macs:,}")
            if at.tune is not None:   # the same number of validation-only trainings for every configuration
                tuned = tuning.tune_recipe(at.tune, at.train, functools.partial(_build_from, ctx, config), ctx.splits,
                                           ctx.device, name=f"{config.label}@{ctx.point}")
                ctx = dataclasses.replace(ctx, experiment=dataclasses.replace(at, train=dataclasses.replace(at.train, **tuned.values)),
                                          tuned=_tuned_columns(at.tune, tuned))
                at = ctx.experiment
            results, last_model = [], None
            for index, seed in enumerate(e.seeds):
                seed_start = time.perf_counter()
                model = _build_from(ctx, config, seed).to(ctx.device)
                report = _pruning_reporter(trial, e, prunable, ctx.signals) if index == 0 else None
                conversion = None
                try:
                    if e.convert is not None:   # a conversion study: the teacher's weights, transfer, fine-tuning
                        conversion = convert.convert_seed(ctx, config, seed, model)
                        result = conversion.result
                    else:
                        result = fit(model, ctx.splits, train_config_of(ctx, seed),
                                     callback=report, progress=False)
                except optuna.TrialPruned:
                    rows.append(_row(ctx, trial, key, config, seed, costs, None, "pruned", None,
                                     time.perf_counter() - seed_start))
                    raise
                if not result.ok:
                    rows.append(_row(ctx, trial, key, config, seed, costs, result, "failed", result.error,
                                     time.perf_counter() - seed_start, conversion))
                    raise TrialFailed(f"seed {seed}: {result.error}")
                results.append(result)
                rows.append(_row(ctx, trial, key, config, seed, costs, result, "complete", None,
                                 time.perf_counter() - seed_start, conversion))
                if at.save_checkpoint:
                    rows[-1]["checkpoint_path"] = save_seed_checkpoint(ctx, key, seed, model)
                last_model, seed = model, None
            speed = _speed(ctx, config, models.castle(last_model))
            for row in rows:
                row.update(speed)
        values = _objective_values(e, rows)
        return values if len(values) > 1 else values[0]
    except optuna.TrialPruned:
        raise   # Optuna stores the trial PRUNED; its rows are the seeds that ran
    except (KeyboardInterrupt, SystemExit):
        trial.set_user_attr(INTERRUPTED_ATTR, True)
        rows = []   # an interrupted trial is re-run in full; write nothing
        raise
    except Exception as err:  # a failure of this trial is recorded; the sweep goes on
        failure = err if isinstance(err, TrialFailed) else TrialFailed(f"{type(err).__name__}: {err}")
        _record_failure(ctx, trial, key, config, rows, seed, locals().get("costs", {}), str(failure),
                        time.perf_counter() - started)
        if failure is err:
            raise
        raise failure from err
    finally:
        if rows:
            _store_rows(ctx, trial, key, rows)


def _record_failure(ctx: TrialContext, trial: optuna.Trial, key: int, config: VariantConfig, rows: list[dict],
                    seed: Optional[int], costs: dict, message: str, wall: float) -> None:
    """The failure on the trial, and in its rows: the seed that was training gets a failed row
    (unless it has one); a failure after the seeds (measuring, the objectives) fails their rows;
    a failure before any seed ran is one failed row of the first seed, so the store shows it."""
    trial.set_user_attr(ERROR_ATTR, message)
    if seed is not None and not any(r["seed"] == seed for r in rows):
        rows.append(_row(ctx, trial, key, config, seed, costs, None, "failed", message, wall))
    elif seed is None and rows:
        for row in rows:
            row.update(status="failed", error=message)
    elif not rows:
        rows.append(_row(ctx, trial, key, config, ctx.experiment.seeds[0], costs, None, "failed", message, wall))


def _store_rows(ctx: TrialContext, trial: optuna.Trial, key: int, rows: list[dict]) -> None:
    """Publish the trial's rows as ``trials/trial-<key>.parquet`` if the trial is still this
    worker's; taking the study's lock orders this against failing stale trials (module docstring)."""
    with study_lock(ctx.storage_url, ctx.experiment.name):
        if trial_by_number(trial.study, trial.number).state != TrialState.RUNNING:
            raise TrialTakenOver(f"trial {key} was taken over by another worker")
        store.write_rows(ctx.results, rows, f"trials/trial-{key:05d}")


def _pruning_reporter(trial: optuna.Trial, e: Experiment, prunable: bool,
                      signals: SigintGuard) -> Optional[Callable[[dict], None]]:
    """Reports validation top-1 per epoch; prunes only ``prunable`` trials (the baseline's values
    are reported all the same: they are what the others are compared with)."""
    if not e.pruning:
        return None

    def report(record: dict[str, Any]) -> None:
        with signals.held():   # called from the training: the storage calls wait out a stop signal
            trial.report(record["val_top1"], record["epoch"])
            prune = prunable and trial.should_prune()
        if prune:
            raise optuna.TrialPruned(f"pruned at epoch {record['epoch']} (validation top-1 {record['val_top1']:.2f})")

    return report


def _objective_values(e: Experiment, rows: list[dict]) -> list[float]:
    values = []
    for objective in e.objectives:
        samples = [r[objective.metric] for r in rows if r.get(objective.metric) is not None]
        if not samples:
            switch = schema.OBJECTIVES[objective.metric].measured_by
            raise TrialFailed(f"objective '{objective.metric}' was not measured"
                              + (f" (enable 'measure.{switch}')" if switch else ""))
        values.append(float(statistics.fmean(samples)))
    return values


def plan(checked: CheckedExperiment,
         point: Optional[str] = None) -> tuple[str, list[tuple[VariantConfig, dict[str, Any]]]]:
    """(architecture, [(configuration, MACs and params of its inference form)]) without training,
    at the point of ``across`` labelled ``point`` (the study's own settings for None).

    A continuous search space has no finite plan; then only the base configuration is listed.
    """
    experiment = checked.experiment.at(point)
    ctx = TrialContext(experiment, Path("."), checked.data_at(point), device="cpu",
                       sampler_seed=experiment.sampler_seed, worker="", environment={})
    configs = experiment.plan() or [experiment.resolve({})]
    costs = [(c, _costs(dataclasses.replace(ctx, splits=ctx.data(c.data_options)), c)) for c in configs]
    return costs[0][1]["arch"], costs
