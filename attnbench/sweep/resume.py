"""Honest resumes: a study is resumed only by the experiment it was started with, and only on a
store that holds what the study says it holds.

* :func:`check_resume` compares the experiment with the one recorded on the study when it was
  created (:meth:`Experiment.decisive`, stored as a study attribute): a changed setting that
  decides a trial's outcome is refused, naming the setting, unless no trial has finished yet
  (then failed trials run again under the changed file, and the study records it). A study
  whose database was deleted while its result files stayed is refused too: a new study would
  overwrite them.
* :func:`audit_start` re-queues each finished trial whose result file is missing or unreadable;
  :func:`audit_end` checks that the store holds one row per (trial, seed) of the finished trials.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from attnbench.experiment import Experiment, ExperimentError
from attnbench.experiment_check import ExperimentRefused
from attnbench.results import store
from attnbench.sweep.study import EXPERIMENT_ATTR, requeue, study_progress, trial_key

SPEC_ATTR = "attnbench_experiment_spec"   # study user attr: Experiment.decisive() of the file that started it

#: Experiment.decisive() keys -> the field of the file that sets them (others: the key itself).
_FIELDS = {"arch": "model.arch", "model_kwargs": "model.kwargs", "dataset": "data.dataset", "data_root": "data.root",
           "data_options": "data.options", "configs": "variants", "sampler_seed": "sampler.seed",
           "sampler": "sampler.type", "max_macs": "constraints.max_macs", "points": "across"}
#: Settings that shape Optuna's search space: changed, they break every trial of a started study.
_SPACE = ("configs", "search", "sampler", "points")


def result_file(results: Path, key: int) -> Path:
    """Where the rows of trial ``key`` are stored (``trial.py`` writes them there)."""
    return results / "trials" / f"trial-{key:05d}.parquet"


def _finished(trial: FrozenTrial) -> bool:
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def check_resume(study: optuna.Study, experiment: Experiment, results: Path, storage: str) -> None:
    """Refuse to resume ``study`` with an experiment other than its own (see the module docstring);
    record the experiment on a new study. Call under the study's lock.

    Raises:
        ExperimentRefused: one line: what changed, and how to start a new study.
    """
    trials = study.get_trials(deepcopy=False)
    new = experiment.decisive()
    if not trials:
        stored = sorted(p.name for p in (results / "trials").glob("*.parquet")) if (results / "trials").is_dir() else []
        if stored:
            _refuse(experiment, f"study '{experiment.name}' in {storage} has no trials, but {results / 'trials'} "
                                f"holds {len(stored)} result file(s) ({stored[0]}, ...): its database was deleted "
                                f"or replaced, and a new study would overwrite them; move that folder away (or "
                                f"set another 'name') to start a new study")
        study.set_user_attr(SPEC_ATTR, new)
        return
    old = study.user_attrs.get(SPEC_ATTR)
    if old is None:   # a study of an attnbench that did not record its experiment: the trials' fingerprints
        fingerprint = experiment.fingerprint()
        ran = {t.user_attrs.get(EXPERIMENT_ATTR) for t in trials if _finished(t)} - {None}
        if ran and ran != {fingerprint}:
            _refuse(experiment, f"study '{experiment.name}' in {storage} has trials that ran under another "
                                f"version of this file (fingerprint {', '.join(sorted(ran))}, now {fingerprint})"
                                f"{_START_NEW}")
        study.set_user_attr(SPEC_ATTR, new)
        return
    old = _recipes_resolved(old)
    changes = describe_changes(old, new)
    if not changes:
        return
    keys = {key for key in set(old) | set(new) if old.get(key) != new.get(key)}
    if any(_finished(t) for t in trials) or keys & set(_SPACE):
        shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
        _refuse(experiment, f"study '{experiment.name}' in {storage} was started with another experiment: "
                            f"{shown}; a resume runs the experiment the study started with: undo the change"
                            f"{_START_NEW}")
    study.set_user_attr(SPEC_ATTR, new)   # nothing finished yet: its failed trials run again under this file


_START_NEW = (", or start a new study for it (set another 'name', or --results elsewhere); 'budget' and "
              "'description' may change")


def _recipes_resolved(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with each recipe (``train``, the teacher's) whole: a study started before the
    experiment held a TrainConfig recorded only the fields its file gave, which are the same
    training as those fields over TrainConfig's defaults (how a spec records them now)."""
    from attnbench.train import TrainConfig

    defaults = json.loads(json.dumps(dataclasses.asdict(TrainConfig()), default=str))

    def whole(recipe):
        return {**defaults, **recipe} if isinstance(recipe, dict) else recipe

    out = {**spec, "train": whole(spec.get("train"))}
    if isinstance(spec.get("convert"), dict):
        out["convert"] = {**spec["convert"], "teacher_train": whole(spec["convert"].get("teacher_train"))}
    return out


def _refuse(experiment: Experiment, message: str) -> None:
    raise ExperimentRefused([ExperimentError(experiment.source, "", message)])


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two :meth:`Experiment.decisive` specs, one phrase per setting, in the
    file's terms (``train.max_steps: 30 -> 3``, ``variants: added 'la'``)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        field = _FIELDS.get(key, key)
        if key == "configs" and isinstance(before, list) and isinstance(after, list):
            changes += _config_changes(before, after)
        elif key == "data_options" and isinstance(before, dict) and isinstance(after, dict):
            changes += [f"{'data.seed' if k == 'seed' else f'data.options.{k}'}: {_short(before.get(k))} -> "
                        f"{_short(after.get(k))}" for k in sorted(set(before) | set(after))
                        if before.get(k) != after.get(k)]
        elif isinstance(before, dict) and isinstance(after, dict):
            changes += _dict_changes(field, before, after)
        else:
            changes.append(f"{field}: {_short(before)} -> {_short(after)}")
    return changes


def _dict_changes(field: str, before: dict, after: dict) -> list[str]:
    out = []
    for k in sorted(set(before) | set(after)):
        if before.get(k) == after.get(k):
            continue
        if isinstance(before.get(k), dict) and isinstance(after.get(k), dict):
            out += _dict_changes(f"{field}.{k}", before[k], after[k])
        else:
            out.append(f"{field}.{k}: {_short(before.get(k))} -> {_short(after.get(k))}")
    return out


def _config_changes(before: list, after: list) -> list[str]:
    old = {c.get("label"): c for c in before if isinstance(c, dict)}
    new = {c.get("label"): c for c in after if isinstance(c, dict)}
    out = [f"variants: added '{label}'" for label in new if label not in old]
    out += [f"variants: removed '{label}'" for label in old if label not in new]
    for label in new:
        if label in old and old[label] != new[label]:
            out += [f"variants '{label}' {k}: {_short(old[label].get(k))} -> {_short(new[label].get(k))}"
                    for k in sorted(set(old[label]) | set(new[label])) if old[label].get(k) != new[label].get(k)
                    and k != "field"]
    if not out and list(old) != list(new):
        out.append("variants: listed in another order")
    return out or ["variants: changed"]


def _short(value: Any) -> str:
    text = "unset" if value is None else json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


# --- the store audit ------------------------------------------------------------------------------

@dataclasses.dataclass
class Audit:
    """What the end-of-sweep audit found: rows checked, and each problem in one line."""

    rows: int
    trials: int
    problems: list[str]

    def line(self) -> str:
        if self.problems:
            return f"store audit: {len(self.problems)} problem(s): " + "; ".join(self.problems[:5])
        return f"store audit: {self.rows} rows, one per (trial, seed) of {self.trials} finished trial(s)"


def _readable_rows(path: Path) -> Optional[str]:
    """Why the result file ``path`` cannot stand for its trial, or None."""
    if not path.is_file():
        return "its result file is missing"
    try:
        table = store.read_file(path)
    except store.StoreError as err:
        return str(err).removeprefix(f"{path}: ")
    return None if table.num_rows else "its result file holds no rows"


def audit_start(study: optuna.Study, results: Path) -> list[FrozenTrial]:
    """Queue again every finished trial whose result file is missing or unreadable (deleted, or
    replaced with garbage): the study says it is done, the store says otherwise, and the store is
    what a report reads. Call under the study's lock; returns the trials re-queued, with why."""
    latest: dict[int, FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        latest[trial_key(t)] = t
    stale = []
    for key, t in sorted(latest.items()):
        if t.state == TrialState.COMPLETE:
            reason = _readable_rows(result_file(results, key))
            if reason:
                stale.append((t, reason))
    requeue(study, [t for t, _ in stale])
    return stale


def audit_end(study: optuna.Study, experiment: Experiment, results: Path) -> Audit:
    """One row per (trial, seed) of every complete trial, none doubled, no rows of unknown trials
    (pruned trials: the seeds that ran)."""
    state = study_progress(study)
    latest: dict[int, FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        latest[trial_key(t)] = t
    finished = {key: t for key, t in latest.items() if _finished(t) or (key in {trial_key(f) for f in state.failures})}
    contents = store.read_store(results / "trials", kind="trial")
    frame = contents.rows
    problems = [f"{s.path.name}: {s.reason}" for s in contents.skipped]
    doubled = frame[frame.duplicated(["trial", "seed"], keep=False)] if not frame.empty else frame
    if not doubled.empty:
        pairs = sorted({(int(r.trial), int(r.seed)) for r in doubled.itertuples()})
        problems.append(f"(trial, seed) stored twice: {pairs[:5]}")
    for key, t in sorted(finished.items()):
        seeds = set(frame.loc[frame["trial"] == key, "seed"].astype(int)) if not frame.empty else set()
        if t.state == TrialState.COMPLETE and seeds != set(experiment.seeds):
            missing = sorted(set(experiment.seeds) - seeds)
            problems.append(f"trial {key}: rows of seed(s) {missing} missing" if missing else
                            f"trial {key}: rows of seeds {sorted(seeds)}, expected {list(experiment.seeds)}")
        elif t.state == TrialState.PRUNED and not seeds:
            problems.append(f"trial {key}: pruned, but no row of the seeds that ran")
    unknown = sorted(set(frame["trial"].astype(int)) - set(latest)) if not frame.empty else []
    if unknown:
        problems.append(f"rows of trials the study does not have: {unknown[:5]}")
    return Audit(len(frame), len(finished), problems)
