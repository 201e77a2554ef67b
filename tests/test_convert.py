"""Conversion studies: which teacher weights each variant takes, that converting softmax into softmax
changes nothing, that attention transfer brings each layer to its teacher, and the rows a
conversion study stores; a bad `convert:` block is refused up front."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from attnbench import checkpoints, models, registry
from attnbench.cli import main
from attnbench.convert import Teacher, attention_mse, convert_student, load_teacher_weights, transfer
from attnbench.convert.check import key_plan
from attnbench.convert.spec import ConvertSpec
from attnbench.data import load_dataset
from attnbench.results import store
from attnbench.train import TrainConfig, evaluate, fit

from test_refusals import assert_sweep_refused

BUILT_IN = registry.list_variants(distribution="attnbench")
KW = dict(num_classes=10, in_chans=1, img_size=8, depth=2)
ARCH = "vit_pico_patch2_8"


def _attention_keys(variant: str) -> set[str]:
    layer = next(m for _, m in models.variant_layers(_model(variant, device="meta")))
    return set(layer.state_dict())


def _model(variant: str, seed: int = 0, device: str = "cpu", **options):
    with torch.device(device):
        return models.create_model(ARCH, variant, options, seed=seed if device != "meta" else None, **KW)


@pytest.mark.parametrize("teacher,student", list(itertools.product(BUILT_IN, BUILT_IN)))
def test_which_keys_load_across_every_pair_of_built_in_variants(teacher, student):
    match = key_plan(ARCH, KW, teacher, {}, student, {})
    t_keys, s_keys = _attention_keys(teacher), _attention_keys(student)
    blocks = [f"blocks.{i}.attn." for i in range(KW["depth"])]
    # the projections (and every weight outside attention) always carry over
    assert {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"} <= t_keys & s_keys
    assert set(match.loaded) >= {b + k for b in blocks for k in t_keys & s_keys}
    assert not [k for k in match.loaded if ".attn." in k and k.split(".attn.")[1] not in t_keys & s_keys]
    assert set(match.new) == {b + k for b in blocks for k in s_keys - t_keys}       # the student's own (dconv)
    assert set(match.unused) == {b + k for b in blocks for k in t_keys - s_keys}    # the teacher's own
    assert match.mismatched == ()
    if "dconv.weight" in s_keys - t_keys:
        student_model = _model(student)
        report = load_teacher_weights(student_model, _model(teacher).state_dict(), "zero")
        assert report["new"] == {f"{b}dconv.weight": "zero" for b in blocks}
        assert all(float(layer.dconv.weight.detach().abs().sum()) == 0 for _, layer in models.variant_layers(student_model))


TRAIN = dict(batch_size=64, lr=2e-3, num_threads=1, eval_batch_size=1024, warmup_fraction=0.0)


@pytest.fixture(scope="module")
def trained():
    """Digits and a softmax teacher trained briefly on them (its attention is no longer uniform)."""
    splits = load_dataset("digits", seed=0)
    model = _model("softmax", seed=0)
    fit(model, splits, TrainConfig(**TRAIN, epochs=3, seed=0, device="cpu"), progress=False)
    model.eval()
    return splits, Teacher(model, evaluate(model, splits.test)["top1"], evaluate(model, splits.val)["top1"], "t", 0)


def test_softmax_into_softmax_is_exactly_the_teacher_zero_shot_and_transfer_changes_nothing(trained):
    splits, teacher = trained
    student = _model("softmax", seed=5)   # other initial weights: all replaced by the teacher's
    spec = ConvertSpec(transfer_steps=6, finetune_steps=0, eval_every=3)
    outcome = convert_student(teacher, student, splits, spec, TrainConfig(**TRAIN), seed=0, device="cpu")
    c = outcome.columns
    assert c["top1_zero_shot"] == teacher.test_top1 and c["recovery_val_top1"][0] == teacher.val_top1
    assert c["attention_mse_zero_shot"] == 0.0 and c["attention_mse_after_transfer"] == 0.0
    assert c["top1_after_transfer"] == teacher.test_top1 == outcome.result.test_top1_castled
    for key, value in student.state_dict().items():
        assert torch.equal(value, teacher.model.state_dict()[key]), key


@pytest.mark.parametrize("variant,options", [("linear-angular", {"residual": "dwconv"}), ("linear", {})])
def test_attention_transfer_lowers_every_layers_mse_to_the_teacher(trained, variant, options):
    splits, teacher = trained
    student = _model(variant, **options)
    load_teacher_weights(student, teacher.model.state_dict(), "zero")
    frozen = {k: v.clone() for k, v in student.state_dict().items() if ".attn." not in k}
    probe = splits.val.batch(torch.arange(200))[0]
    before = attention_mse(teacher.model, student, probe)
    config = TrainConfig(**TRAIN, weight_decay=0.0, max_steps=15, epochs=3, seed=0, device="cpu")
    transfer(teacher.model, student, splits, config, 15)
    after = attention_mse(teacher.model, student, probe)
    assert len(before) == len(after) == KW["depth"]
    assert all(a < 0.7 * b for a, b in zip(after, before)), (before, after)
    for key, value in frozen.items():   # only the attention layers trained
        assert torch.equal(student.state_dict()[key], value), key
    assert all(p.requires_grad for p in student.parameters()), "requires_grad restored"


STUDY = """
name: conv
model: {{arch: vit_pico_patch2_8, kwargs: {{depth: 1}}}}
data: {{dataset: digits}}
train: {{epochs: 1, batch_size: 64, num_threads: 1, eval_batch_size: 1024}}
convert:
  teacher: {{train: {{epochs: 1, max_steps: 4}}{per_seed}}}
  transfer_steps: 4
  finetune_steps: 5
  eval_every: 2
  finetune: {finetune}
variants:
  - softmax
  - {{label: +dwconv, variant: linear-angular, options: {{residual: dwconv}}}}
  - castling
seeds: [0, 1]
measure: {{latency: false, memory: false}}
"""


def _study(tmp_path: Path, per_seed=False, finetune="all", **replace) -> Path:
    text = STUDY.format(per_seed=", per_seed: true" if per_seed else "", finetune=finetune)
    for old, new in replace.items():
        text = text.replace(old.replace("_", " "), new)
    path = tmp_path / "conv.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("per_seed", [False, True])
def test_a_conversion_study_stores_the_four_top1_and_the_recovery_curve(tmp_path, per_seed):
    results = tmp_path / "results"
    done = CliRunner().invoke(main, ["sweep", str(_study(tmp_path, per_seed)), "--results", str(results),
                                     "--device", "cpu"])
    assert done.exit_code == 0, done.output
    rows = store.read_rows(results / "conv", kind="trial")
    assert len(rows) == 6 and set(rows["status"]) == {"complete"}
    for column in ("teacher_top1", "top1_zero_shot", "top1_after_transfer", "top1", "teacher_val_top1",
                   "attention_mse_zero_shot", "attention_mse_after_transfer"):
        assert rows[column].notna().all() and rows[column].between(0, 100).all(), column
    for steps, values in zip(rows["recovery_steps"], rows["recovery_val_top1"]):
        assert list(steps) == [0, 2, 4, 6, 8, 9] and len(values) == 6   # transfer 4, then fine-tuning 5
        assert all(0 <= v <= 100 for v in values)
    assert (rows["steps"] == 9).all()
    teachers = sorted((results / "conv" / "teacher").glob("*.safetensors"))
    assert len(teachers) == (2 if per_seed else 1)          # trained once (a seed), then reused
    assert rows["teacher_checkpoint"].nunique() == len(teachers)
    assert (rows.groupby("seed")["teacher_top1"].nunique() == 1).all()
    softmax = rows[rows["label"] == "softmax"]
    assert (softmax["top1_zero_shot"] == softmax["teacher_top1"]).all()
    keys = {row.label: json.loads(row.convert_keys) for row in rows.itertuples()}
    assert keys["+dwconv"]["new"] == {"blocks.0.attn.dconv.weight": "zero"} and keys["softmax"]["new"] == {}
    castling = rows[rows["label"] == "castling"]
    assert castling["top1_train_form"].notna().all()        # top1 is the castled form's
    for row in rows.itertuples():                            # the teacher's file is the teacher
        state = checkpoints.read_state_dict(results / "conv" / row.teacher_checkpoint)
        assert set(state) == set(models.create_model(ARCH, "softmax", **{**KW, "depth": 1}).state_dict())


def test_dry_run_shows_the_conversion_plan(tmp_path):
    results = tmp_path / "results"
    done = CliRunner().invoke(main, ["sweep", str(_study(tmp_path, finetune="attention")), "--results",
                                     str(results), "--dry-run", "--device", "cpu"], env={"COLUMNS": "120"})
    assert done.exit_code == 0, done.output
    assert "teacher: softmax, trained once, seed 0" in done.output
    assert "fine-tuning 5 updates (attention parameters)" in done.output
    assert "+dwconv: takes 20 of the teacher's 20 weights; new: dconv.weight" in done.output
    assert not results.exists()


def _wrong_teacher(tmp_path: Path) -> str:
    path = tmp_path / "deep.safetensors"
    deeper = models.create_model(ARCH, "softmax", **{**KW, "depth": 2})
    checkpoints.save_state_dict(deeper.state_dict(), path)
    return str(path)


REFUSALS = [
    ("unknown-field", {"eval_every: 2": "eval_evry: 2"}, "convert.eval_evry", "did you mean 'eval_every'?"),
    ("both-teachers", {"{train: {epochs: 1, max_steps: 4}}": "{train: {epochs: 1}, checkpoint: t.pt}"},
     "convert.teacher", "give either 'train'"),
    ("no-teacher", {"  teacher: {train: {epochs: 1, max_steps: 4}}\n": ""}, "convert.teacher", "missing"),
    ("bad-finetune", {"finetune: all": "finetune: atention"}, "convert.finetune", "did you mean 'attention'?"),
    ("eval-every-zero", {"eval_every: 2": "eval_every: 0"}, "convert.eval_every", "expected an integer >= 1"),
    ("negative-steps", {"transfer_steps: 4": "transfer_steps: -1"}, "convert.transfer_steps", ">= 0"),
    ("teacher-train-typo", {"max_steps: 4}}": "max_stepz: 4}}"}, "convert.teacher.train.max_stepz",
     "did you mean 'max_steps'?"),
    ("teacher-lr", {"max_steps: 4}}": "max_steps: 4, lr: -1}}"}, "convert.teacher.train.lr", "lr must be a finite number > 0"),
    ("missing-teacher-file", {"{train: {epochs: 1, max_steps: 4}}": "{checkpoint: TMP/nope.safetensors}"},
     "convert.teacher.checkpoint", "does not exist"),
    ("wrong-teacher-file", {"{train: {epochs: 1, max_steps: 4}}": "{checkpoint: WRONG}"},
     "convert.teacher.checkpoint", "is not a trained 'vit_pico_patch2_8' teacher for this data: 12 weight(s) are "
                                   "not the teacher's"),
    ("pruning", {"seeds: [0, 1]": "seeds: [0, 1]\npruning: true"}, "pruning", "reports every configuration"),
    ("new-parameters", {"finetune: all": "finetune: all\n  new_parameters: random"}, "convert.new_parameters",
     "expected one of zero, init"),
]


@pytest.mark.parametrize("name,replace,field,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_bad_convert_block_is_refused_in_one_line_before_anything_is_written(tmp_path, name, replace, field,
                                                                               message):
    text = STUDY.format(per_seed="", finetune="all")
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new.replace("TMP", str(tmp_path)).replace("WRONG", _wrong_teacher(tmp_path)
                                                                             if "WRONG" in new else ""))
    path = tmp_path / "conv.yaml"
    path.write_text(text)
    assert_sweep_refused(tmp_path, path, ["--device", "cpu"], field, message)


def _conversion_rows():
    import pandas as pd

    rows = []
    teacher_val = 80.0
    for seed, noise in zip((0, 1, 2), (0.0, 0.4, -0.3)):
        for label, variant, top1, curve in (("softmax", "softmax", 81.0, [80.0, 80.5, 81.0]),
                                            ("la", "linear-angular", 78.0, [10.0, 70.0, 79.2]),
                                            ("none", "identity", 60.0, [10.0, 40.0, 60.0])):
            rows.append({"kind": "trial", "study": "c", "label": label, "variant": variant, "options": "{}",
                         "seed": seed, "status": "complete", "top1": top1 + noise, "teacher_top1": 80.5,
                         "teacher_val_top1": teacher_val, "top1_zero_shot": curve[0], "top1_after_transfer": curve[1],
                         "recovery_steps": [0, 50, 100], "recovery_val_top1": [v + noise for v in curve],
                         "convert_config": json.dumps({"transfer_steps": 50, "finetune_steps": 50,
                                                       "finetune": "all"}), "macs": 1000})
    return pd.DataFrame(rows)


def test_the_report_compares_each_configuration_with_its_teacher_and_plots_the_recovery(tmp_path):
    from attnbench.results import plots, report

    trials = _conversion_rows()
    summary = report.summarize(trials).set_index("config")
    assert summary.loc["la", "top1_zero_shot"] == 10.0 and summary.loc["la", "top1_after_transfer"] == 70.0
    assert summary.loc["la", "delta_teacher"] == pytest.approx(78.0 + 0.1 / 3 - 80.5)
    assert summary.loc["la", "test"] == "paired" and summary.loc["la", "beyond_noise"] == "yes"
    # the mean curve comes within 1 point of the teacher's validation top-1 (80) at update 100 for 'la'
    assert summary.loc["la", "steps_to_teacher"] == 100 and summary.loc["softmax", "steps_to_teacher"] == 0
    assert pd_isna(summary.loc["none", "steps_to_teacher"])
    text = report.export(report.summarize(trials), "markdown")
    assert "| configuration | n | teacher % | zero-shot % | after transfer % | top-1 % | Δ vs teacher |" in text
    assert "| none | 3 | 80.50 | 10.00 ± 0.00 | 40.00 ± 0.00 |" in text and "&gt; 100" in text   # Markdown escapes the ">"
    assert "50 updates of attention transfer, then 50 of fine-tuning" in text
    path = plots.recovery_plot(trials, report.summarize(trials), tmp_path / "recovery.png")
    assert path is not None and path.stat().st_size > 10_000
    assert plots.recovery_plot(trials.drop(columns=["recovery_steps"]), report.summarize(trials), tmp_path / "x.png") \
        is None


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))
