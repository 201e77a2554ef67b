"""The result schema: every stored column's name, Arrow type, unit, meaning and objective role.

One place owns the vocabulary of stored numbers. The store writes every file with the full
:data:`ARROW_SCHEMA` (absent values as typed nulls), so any mix of result files, of either kind,
reads as one table with pandas, pyarrow or DuckDB; sweeps and benchmarks build their rows with
:func:`check_row`; the experiment parser takes objective names from :data:`OBJECTIVES`; report
and plots name columns through :func:`names`. ``docs/results.md`` holds :func:`markdown_table`.

Row kinds: ``trial`` (one row per (trial, seed) of a sweep) and ``benchmark`` (one row per
(variant, token count) of ``attnbench bench``).

Bump :data:`SCHEMA_VERSION` when a column is added, removed, renamed or changes meaning, and
teach :func:`attnbench.results.store` to upgrade files of the previous version on read. A column
added later names its version (``since``): files of an earlier version lack it and are read with
nulls in it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import pyarrow as pa

__all__ = ["SCHEMA_VERSION", "KINDS", "TRIAL", "BENCHMARK", "Column", "COLUMNS", "BY_NAME", "ARROW_SCHEMA",
           "BASELINE", "OBJECTIVES", "Objective", "names", "columns_of", "columns_since", "check_row", "markdown_table",
           "SchemaError"]

#: Version of the row layout below; stored in every row and in each file's metadata.
SCHEMA_VERSION = 7

TRIAL = "trial"
BENCHMARK = "benchmark"
KINDS = (TRIAL, BENCHMARK)
_BOTH = (TRIAL, BENCHMARK)


class SchemaError(ValueError):
    """A row or a column name that the result schema does not know."""


@dataclasses.dataclass(frozen=True)
class Objective:
    """How a column may serve as an optimisation objective of a sweep."""

    direction: str                  # "maximize" or "minimize"
    measured_by: Optional[str]      # the experiment's ``measure`` switch that produces it; None: always


@dataclasses.dataclass(frozen=True)
class Column:
    """One stored column."""

    name: str
    type: pa.DataType
    unit: str                       # "" when dimensionless or text
    meaning: str                    # one line
    kinds: tuple[str, ...] = _BOTH  # the row kinds that fill it
    objective: Optional[Objective] = None
    since: int = 2                  # the schema version that added it (files of version 2 on: see the store)


def _c(name, type_, unit, meaning, kinds=_BOTH, objective=None, since=2) -> Column:
    return Column(name, type_, unit, meaning, tuple(kinds), objective, since)


_S, _I, _F, _B = pa.string(), pa.int64(), pa.float64(), pa.bool_()
_LF = pa.list_(pa.float64())   # one value per epoch (or per point of a curve)
_LI = pa.list_(pa.int64())
_T = pa.timestamp("us", tz="UTC")
_TR, _BE = (TRIAL,), (BENCHMARK,)
_MAX, _MIN = "maximize", "minimize"

#: Every column, in file order.
COLUMNS: tuple[Column, ...] = (
    # --- identity ---------------------------------------------------------------------------------
    _c("kind", _S, "", "row kind: 'trial' (a sweep's (trial, seed)) or 'benchmark' (bench's (variant, N))"),
    _c("schema_version", _I, "", "result schema version the row was written with (older rows are upgraded on read)"),
    _c("created_at", _T, "UTC", "when the row was made (trial: the seed finished; benchmark: the run started)"),
    _c("study", _S, "", "experiment (study) name", _TR),
    _c("trial", _I, "", "trial key: stable across resumes, names the file trials/trial-KEY.parquet", _TR),
    _c("optuna_trial", _I, "", "Optuna's trial number", _TR),
    _c("seed", _I, "", "training seed (model init, dropout, batch order)", _TR),
    _c("run_id", _S, "", "benchmark run id (UTC start time and a random suffix)", _BE),
    _c("label", _S, "", "configuration label from the experiment file (text as written)", _TR),
    _c("variant", _S, "", "registered variant name"),
    _c("options", _S, "", "JSON: every option of the variant as it ran, defaults included"),
    _c("params_json", _S, "", "JSON: the parameters Optuna suggested for the trial", _TR),
    _c("point", _S, "", "label of the experiment's 'across' point the trial ran at (text as written; null "
                        "without 'across')", _TR, since=5),
    _c("point_index", _I, "", "position of that point under 'across', from 0 (the order the report keeps)", _TR,
       since=5),
    # --- provenance -------------------------------------------------------------------------------
    _c("attnbench_version", _S, "", "attnbench version that wrote the row"),
    _c("variant_distribution", _S, "", "distribution that provided the variant ('attnbench' built-in, a plugin's "
                                       "name, or 'in-process' for register_variant)"),
    _c("variant_distribution_version", _S, "", "version of that distribution (null for in-process variants)"),
    _c("kernel_requested", _S, "", "kernel implementation asked for: fast, reference or compile"),
    _c("kernel_implementation", _S, "", "kernel implementation that really ran for this variant (after any "
                                        "compile fallback); 'n/a' for a variant with a single implementation"),
    _c("precision", _S, "", "numeric precision: float32, or bfloat16/float16 autocast; of training (trial rows, "
                            "the train config's 'precision') or of the timed forwards (benchmark rows, --dtype)"),
    _c("train_config", _S, "", "JSON: every training setting as run (TrainConfig fields, defaults included)", _TR),
    _c("arch", _S, "", "timm architecture of the model", _TR),
    _c("model_kwargs", _S, "", "JSON: extra keyword arguments of the model", _TR),
    _c("dataset", _S, "", "data set name", _TR),
    _c("data_root", _S, "", "data set folder (null for embedded data sets)", _TR),
    _c("data_options", _S, "", "JSON: every data set option as loaded, defaults included", _TR),
    _c("data_seed", _I, "", "seed of the train/validation/test split", _TR),
    _c("num_classes", _I, "", "classes of the data set", _TR),
    _c("in_chans", _I, "", "image channels", _TR),
    _c("img_size", _I, "pixels", "image side as fed to the model", _TR),
    _c("n_train", _I, "images", "training split size", _TR),
    _c("n_val", _I, "images", "validation split size", _TR),
    _c("n_test", _I, "images", "test split size", _TR),
    _c("sampler", _S, "", "Optuna sampler: grid, tpe, nsga2 or random", _TR),
    _c("sampler_seed", _I, "", "seed of this worker's sampler", _TR),
    _c("worker", _S, "", "worker that ran the trial (host:pid)", _TR),
    # --- outcome ----------------------------------------------------------------------------------
    _c("status", _S, "", "complete, failed or pruned", _TR),
    _c("error", _S, "", "why the trial failed or was pruned (null when complete)", _TR),
    _c("wall_time_s", _F, "s", "wall time of this seed: build, train and evaluate", _TR),
    # --- benchmark setup --------------------------------------------------------------------------
    _c("level", _S, "", "benchmarked module: 'layer' (one attention layer) or 'model' (a timm ViT)", _BE),
    _c("tokens", _I, "tokens", "sequence length N", _BE),
    _c("dim", _I, "", "token width C", _BE),
    _c("heads", _I, "", "attention heads", _BE),
    _c("depth", _I, "blocks", "blocks of the model-level ViT (null at layer level)", _BE),
    _c("patch_size", _I, "pixels", "patch side of the model-level ViT (null at layer level)", _BE),
    _c("processes", _I, "", "fresh timing processes", _BE),
    _c("samples_per_process", _I, "", "timed blocks per (variant, N) in each process", _BE),
    _c("warmup_calls", _I, "", "untimed calls per (variant, N) before timing", _BE),
    # --- costs ------------------------------------------------------------------------------------
    _c("macs", _I, "MACs", "multiply-accumulates of one sample, inference form, counted (1 MAC = 2 FLOPs)",
       objective=Objective(_MIN, None)),
    _c("attention_macs", _I, "MACs", "analytic MACs of the attention layers (projections and core), one sample",
       objective=Objective(_MIN, None)),
    _c("params", _I, "", "parameters of the inference form", objective=Objective(_MIN, None)),
    _c("num_tokens", _I, "tokens", "tokens per image the model attends over (patches and prefix tokens)", _TR),
    # --- accuracy ---------------------------------------------------------------------------------
    _c("top1", _F, "%", "test top-1 of the inference form (after castling)", _TR, Objective(_MAX, None)),
    _c("top1_train_form", _F, "%", "test top-1 of the training form (before castling)", _TR, Objective(_MAX, None)),
    _c("switch_cost", _F, "points", "top1_train_form - top1", _TR, Objective(_MIN, None)),
    _c("switch_flips", _F, "fraction", "test images whose prediction changes across castling", _TR),
    _c("best_val_top1", _F, "%", "validation top-1 of the evaluated checkpoint, training form", _TR),
    _c("best_val_top1_castled", _F, "%", "validation top-1 of the evaluated checkpoint, after castling", _TR),
    _c("checkpoint", _S, "", "evaluated weights: best_val or last", _TR),
    _c("best_epoch", _I, "", "epoch of the evaluated checkpoint (from 0: an index into the curve_* lists)", _TR),
    _c("epochs_run", _I, "", "epochs trained", _TR),
    _c("still_improving", _B, "", "the highest validation top-1 (ties: lower validation loss) came at the last "
                                  "epoch trained: the curve had not peaked", _TR, since=3),
    # --- learning curves: one value per epoch trained, epoch 0 first ------------------------------
    _c("curve_train_loss", _LF, "", "per epoch: training cross-entropy, mean over its batches (label smoothing "
                                    "and augmentation as trained, regularisation excluded)", _TR, since=3),
    _c("curve_train_top1", _LF, "%", "per epoch: top-1 on the training batches as trained (augmented)", _TR,
       since=3),
    _c("curve_val_top1", _LF, "%", "per epoch: validation top-1 at the epoch's end, training form", _TR, since=3),
    _c("curve_val_loss", _LF, "", "per epoch: validation cross-entropy at the epoch's end, training form", _TR,
       since=3),
    _c("curve_lr", _LF, "", "per epoch: learning rate at the epoch's end (after its last update)", _TR, since=3),
    _c("steps", _I, "", "optimiser updates", _TR),
    _c("train_time_s", _F, "s", "training time", _TR),
    _c("stopped", _B, "", "training stopped by its time budget", _TR),
    _c("mask_density_end", _F, "fraction", "Castling mask density at the checkpoint, mean over layers", _TR),
    _c("branch_ratio_end", _F, "", "Castling |S v| / |y| at the checkpoint, mean over layers", _TR),
    _c("mask_density_curve", _S, "", "JSON: [{progress, layer, mask_density, branch_ratio}] over training", _TR),
    _c("init_checkpoint", _S, "", "model.checkpoint: the local file the model started from (null: initialised "
                                  "from the seed)", _TR, since=4),
    _c("checkpoint_path", _S, "", "train.save_checkpoint: the file holding this seed's evaluated weights, relative "
                                  "to the study's results folder", _TR, since=4),
    # --- conversion studies (convert:): a trained teacher swapped into each configuration ----------
    _c("teacher_top1", _F, "%", "conversion: the teacher's test top-1 (inference form)", _TR, since=4),
    _c("teacher_val_top1", _F, "%", "conversion: the teacher's validation top-1 (the recovery curve's reference)",
       _TR, since=4),
    _c("teacher_checkpoint", _S, "", "conversion: the teacher's file (relative to the study's results folder when "
                                     "trained there)", _TR, since=4),
    _c("top1_zero_shot", _F, "%", "conversion: test top-1 with the teacher's weights loaded, before any training "
                                  "(inference form)", _TR, since=4),
    _c("top1_after_transfer", _F, "%", "conversion: test top-1 after attention transfer (inference form); top1 is "
                                       "after fine-tuning", _TR, since=4),
    _c("attention_mse_zero_shot", _F, "", "conversion: per-layer MSE of the attention outputs to the teacher's "
                                          "(given its inputs), mean over layers, before transfer", _TR, since=4),
    _c("attention_mse_after_transfer", _F, "", "conversion: the same after attention transfer", _TR, since=4),
    _c("recovery_steps", _LI, "updates", "conversion: the updates at which the recovery curve was measured (0: "
                                         "zero-shot; transfer first, then fine-tuning)", _TR, since=4),
    _c("recovery_val_top1", _LF, "%", "conversion: validation top-1 (inference form) at each of recovery_steps",
       _TR, since=4),
    _c("convert_keys", _S, "", "conversion: JSON {loaded: count, new: {key: how it started (zero or init)}, "
                               "unused: [teacher keys not loaded]}", _TR, since=4),
    _c("convert_config", _S, "", "conversion: JSON, the convert block as run", _TR, since=4),
    _c("tuned_lr", _F, "", "tune: the learning rate tuning chose for this configuration (on validation)", _TR,
       since=7),
    _c("tuned_weight_decay", _F, "", "tune: the weight decay tuning chose (null when not tuned)", _TR, since=7),
    _c("tuning_seed", _I, "", "tune: the seed of the tuning trainings", _TR, since=7),
    _c("tuning_trials", _S, "", "tune: JSON, every tuning training: [{lr, weight_decay, val_top1, status}] (validation "
                                "top-1 of the inference form; the test split is never evaluated while tuning)", _TR,
       since=7),
    _c("train_device", _S, "", "device the model was trained on", _TR),
    _c("train_threads", _I, "", "torch threads during training", _TR),
    # --- speed and memory -------------------------------------------------------------------------
    _c("measure_batch", _I, "samples", "batch size of the timed and memory forwards"),
    _c("latency_median_ms", _F, "ms", "latency of one forward of the batch, median (benchmark: over processes)",
       objective=Objective(_MIN, "latency")),
    _c("latency_iqr_ms", _F, "ms", "interquartile range of the latency within a process"),
    _c("latency_min_ms", _F, "ms", "fastest process median", _BE),
    _c("latency_max_ms", _F, "ms", "slowest process median", _BE),
    _c("latency_spread_pct", _F, "%", "(max - min) / median of the process medians", _BE),
    _c("latency_process_ms", _S, "ms", "JSON: each process's median", _BE),
    _c("samples_per_s", _F, "samples/s", "throughput at the median latency", objective=Objective(_MAX, "latency")),
    _c("forward_memory_mb", _F, "MiB", "peak memory rise during one inference forward of the batch",
       objective=Objective(_MIN, "memory")),
    _c("process_peak_memory_mb", _F, "MiB", "peak memory of the whole measuring process (interpreter, torch)"),
    _c("memory_method", _S, "", "how memory was measured (e.g. 'cpu child VmHWM-VmRSS')"),
    _c("floor_ms", _F, "ms", "layer level: the layer's matmul floor (its qkv and proj projections and its core's "
                             "batched matmuls, AttentionVariant.core_matmuls), timed alone in the same rounds, median "
                             "over processes", _BE, since=7),
    _c("floor_ratio", _F, "x", "latency_median_ms / floor_ms: how far the layer is from its matmul floor", _BE,
       since=7),
    _c("speedup_vs_softmax", _F, "x", "softmax's latency / this latency at the same N", _BE),
    _c("crossover_tokens", _F, "tokens", "N where the variant becomes faster than softmax (interpolated)", _BE),
    _c("crossover_note", _S, "", "why crossover_tokens is null: below range, none in range, baseline", _BE),
    # --- environment ------------------------------------------------------------------------------
    _c("torch_version", _S, "", "torch version"),
    _c("timm_version", _S, "", "timm version"),
    _c("python_version", _S, "", "Python version"),
    _c("platform", _S, "", "operating system and machine"),
    _c("hostname", _S, "", "host name"),
    _c("device", _S, "", "device measured on (cpu, cuda, cuda:1)"),
    _c("device_name", _S, "", "GPU name, or the CPU model on CPU"),
    _c("threads", _I, "", "torch threads of the measurement"),
    _c("cpu_model", _S, "", "CPU model"),
    _c("cpu_count", _I, "", "cores this process may use"),
    _c("load_avg_1m", _F, "", "1-minute load average when measuring started"),
    _c("git_commit", _S, "", "commit of the git repository holding the working directory (null outside one)"),
    _c("git_dirty", _B, "", "that repository had uncommitted changes"),
    _c("allocator", _S, "", "malloc setting (attnbench.allocator)"),
    _c("cpu_capability", _S, "", "CPU instruction set torch dispatched its kernels to (AVX512, AVX2, DEFAULT, ...)",
       since=6),
    _c("blas", _S, "", "BLAS (and its version) and oneDNN torch was built with", since=6),
    _c("torch_git", _S, "", "commit torch was built from", since=6),
    _c("cuda_version", _S, "", "CUDA torch ran with, on a GPU (null on the CPU)", since=6),
    _c("cudnn_version", _S, "", "cuDNN torch ran with, on a GPU (null on the CPU)", since=6),
)

BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
assert len(BY_NAME) == len(COLUMNS), "a column is listed twice"

#: The Arrow schema of every result file.
ARROW_SCHEMA = pa.schema([pa.field(c.name, c.type, nullable=True) for c in COLUMNS])

#: The configuration label (and benchmark variant) every comparison is made against by default,
#: where a study or a benchmark has it.
BASELINE = "softmax"

#: Columns that may be an objective of a sweep: name -> Objective (direction, measure switch).
OBJECTIVES: dict[str, Objective] = {c.name: c.objective for c in COLUMNS
                                    if c.objective is not None and TRIAL in c.kinds}


def names(*wanted: str) -> tuple[str, ...]:
    """``wanted`` unchanged, after checking that each is a column (so a typo fails at import)."""
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        raise SchemaError(f"not result columns: {', '.join(unknown)}")
    return wanted


def columns_of(kind: str) -> tuple[str, ...]:
    """The columns a row of ``kind`` fills (where measured)."""
    return tuple(c.name for c in COLUMNS if kind in c.kinds)


def check_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` unchanged if its kind is known and every key is a column of that kind.

    Raises:
        SchemaError: an unknown kind, or a key that is not a column of it (one line, naming it).
    """
    kind = row.get("kind")
    if kind not in KINDS:
        raise SchemaError(f"row kind {kind!r} is not one of {', '.join(KINDS)}")
    for key in row:
        column = BY_NAME.get(key)
        if column is None:
            raise SchemaError(f"column '{key}' is not in the result schema (attnbench/results/schema.py)")
        if kind not in column.kinds:
            raise SchemaError(f"column '{key}' is not a column of {kind} rows")
    return row


def columns_since(version: int) -> tuple[Column, ...]:
    """The columns a file of schema ``version`` (2 or later) has, in file order."""
    return tuple(c for c in COLUMNS if c.since <= version)


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"list<{_type_name(t.value_type)}>"
    return {"string": "string", "int64": "int64", "double": "float64", "bool": "bool"}.get(str(t), str(t))


def markdown_table() -> str:
    """The columns as a Markdown table (name, type, unit, kinds, meaning, objective); docs/results.md holds it."""
    lines = ["| column | type | unit | rows | meaning | objective |", "|---|---|---|---|---|---|"]
    for c in COLUMNS:
        kinds = "both" if set(c.kinds) == set(KINDS) else c.kinds[0]
        objective = ""
        if c.objective is not None and TRIAL in c.kinds:
            objective = c.objective.direction + (f" (measure.{c.objective.measured_by})"
                                                 if c.objective.measured_by else "")
        cells = [f"`{c.name}`", _type_name(c.type), c.unit, kinds, c.meaning.replace("|", "\\|"), objective]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
