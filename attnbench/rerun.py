"""Train a stored row's configuration again, from what the row records, and compare.

A trial row records everything that decides its training: the data set, its options and split
seed, the architecture and its keywords, the variant and its resolved options, the training
recipe with its seed (``train_config``), and the machine and libraries it ran on
(:func:`attnbench.provenance.environment`). :func:`rerun` rebuilds the run from those columns alone
and trains it; on the same machine, with the same libraries and thread count, the new top-1 equals
the stored one exactly. :func:`machine_differences` names what differs where it does not.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Optional

__all__ = ["RerunError", "Rerun", "rerun", "machine_differences", "REPEATS_WITH"]

#: The columns that must agree for a run to repeat bit for bit (besides the row's own settings).
REPEATS_WITH = ("torch_version", "timm_version", "cpu_model", "cpu_capability", "blas", "torch_git", "train_device",
                "train_threads", "cuda_version", "cudnn_version", "device_name")


class RerunError(ValueError):
    """A row that cannot be trained again from its columns (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Rerun:
    """The stored and the new figures of one row, and what differs between the two machines."""

    stored_top1: float
    top1: float
    stored_top1_train_form: float
    top1_train_form: float
    differences: dict[str, tuple[Any, Any]]   # column -> (stored, now), among REPEATS_WITH

    @property
    def identical(self) -> bool:
        """The new top-1 (both forms) equals the stored one exactly."""
        return self.top1 == self.stored_top1 and self.top1_train_form == self.stored_top1_train_form


def _json(row: Mapping[str, Any], column: str) -> Any:
    value = row.get(column)
    if not isinstance(value, str):
        raise RerunError(f"the row has no '{column}' (written by an older attnbench?)")
    return json.loads(value)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def machine_differences(row: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The columns of :data:`REPEATS_WITH` recorded in both whose values differ (an older row may
    lack some: those are not compared)."""
    return {column: (row[column], now[column]) for column in REPEATS_WITH
            if _present(row.get(column)) and _present(now.get(column)) and row[column] != now[column]}


def rerun(row: Mapping[str, Any], device: Optional[str] = None, progress: bool = False) -> Rerun:
    """Train the configuration of a stored trial row again and return both figures.

    Args:
        row: one trial row (``attnbench.results.store.read_rows``), complete.
        device: where to train (default: the device the row trained on).

    Raises:
        RerunError: a row that is not a complete training row, or that cannot repeat (a conversion
            study's row, a time budget, an initial checkpoint that is gone).
    """
    from attnbench import data, models, provenance
    from attnbench.train import TrainConfig, fit, resolve_device

    if row.get("kind") != "trial" or row.get("status") != "complete":
        raise RerunError("only a complete trial row can be trained again")
    if _present(row.get("convert_config")):
        raise RerunError("a conversion study's row starts from its teacher: run the study again instead")
    config = _json(row, "train_config")
    if config.get("time_budget_s") is not None:
        raise RerunError(f"its training stopped on a time budget ({config['time_budget_s']} s), which does not "
                         f"repeat")
    config["device"] = device or (row["train_device"] if _present(row.get("train_device")) else config["device"])
    options = _json(row, "data_options")
    splits = data.load_dataset(row["dataset"], root=row["data_root"] if _present(row.get("data_root")) else None,
                               seed=int(row["data_seed"]), **options)
    model_kwargs = _json(row, "model_kwargs") if _present(row.get("model_kwargs")) else {}
    model = models.create_model(row["arch"], row["variant"], _json(row, "options"), seed=int(row["seed"]),
                                **splits.model_kwargs(), **model_kwargs)
    if _present(row.get("init_checkpoint")):
        models.load_checkpoint(model, row["init_checkpoint"])
    train_config = TrainConfig(**config)
    result = fit(model.to(resolve_device(train_config.device)), splits, train_config,
                 progress=progress).raise_for_status()
    now = {**provenance.environment(result.device), "train_device": result.device,
           "train_threads": result.num_threads}
    return Rerun(float(row["top1"]), result.test_top1_castled, float(row["top1_train_form"]), result.test_top1,
                 machine_differences(row, now))
