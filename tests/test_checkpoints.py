"""Checkpoints: written by `attnbench train --save` and by a sweep's `train.save_checkpoint`, read back bit
for bit; `model.checkpoint` starts every trial from a file, and one that is missing or does not fit
is refused before anything is written."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from attnbench import checkpoints, models, train
from attnbench.cli import main
from attnbench.data import load_dataset
from attnbench.results import store

from test_refusals import assert_sweep_refused

FAST = ["--max-steps", "3", "--model-option", "depth=1", "--no-progress", "--device", "cpu", "--num-threads", "1",
        "--eval-batch-size", "1024"]


def _digits_model(variant="softmax", depth=1, seed=0, **kwargs):
    return models.create_model("vit_pico_patch2_8", variant, seed=seed, num_classes=10, in_chans=1, img_size=8,
                               depth=depth, **kwargs)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_checkpoint_written_by_train_loads_back_bit_for_bit(tmp_path, suffix):
    path = tmp_path / "sub" / f"model{suffix}"
    out = tmp_path / "run.json"
    done = CliRunner().invoke(main, ["train", "softmax", *FAST, "--save", str(path), "--json", str(out)])
    assert done.exit_code == 0, done.output
    assert path.is_file() and not list(path.parent.glob(".*")), "no scratch file is left beside it"
    assert path.stat().st_mode & 0o777 == 0o666 & ~checkpoints._umask(), "created as open() creates files"
    model = _digits_model(seed=123)   # other initial weights: everything must come from the file
    report = models.load_checkpoint(model, path)
    assert report["missing"] == [] and report["unexpected"] == [] and report["mismatched"] == []
    saved = checkpoints.read_state_dict(path)
    assert set(saved) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert value.dtype == saved[key].dtype and torch.equal(value, saved[key]), key
    # and it is the evaluated checkpoint: the same test top-1 as the run reported
    import json
    result = json.loads(out.read_text())[0]
    splits = load_dataset("digits", seed=0)
    assert train.evaluate(model, splits.test)["top1"] == pytest.approx(result["test_top1_castled"], abs=1e-9)


def test_torch_files_are_read_with_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "code": object()}, path)   # a pickled object, not a tensor
    with pytest.raises(checkpoints.CheckpointError, match="could not be read as a state dict"):
        checkpoints.read_state_dict(path)


def test_timm_style_wrappers_and_prefixes_are_accepted(tmp_path):
    source = _digits_model(seed=1)
    path = tmp_path / "timm.pth"
    torch.save({"state_dict_ema": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    model = _digits_model(seed=2)
    assert models.load_checkpoint(model, path)["missing"] == []
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("args,message", [
    (["softmax", "castling", "--save", "x.safetensors"], "--save: one file holds one model; give one RUN, not 2"),
    (["--save", "model.bin"], "a checkpoint file ends in .safetensors, .pt, .pth"),
])
def test_bad_save_paths_are_refused_before_training(tmp_path, args, message):
    done = CliRunner().invoke(main, ["train", *[a if "." not in a else str(tmp_path / a) for a in args], *FAST])
    assert done.exit_code == 2 and message in done.output and "Traceback" not in done.output, done.output
    assert list(tmp_path.iterdir()) == []


EXPERIMENT = """
name: ckpt
model: {{kwargs: {{depth: 1}}{checkpoint}}}
data: {{dataset: digits}}
train: {{epochs: 1, max_steps: 2, batch_size: 64, num_threads: 1, eval_batch_size: 1024{save}}}
seeds: [0, 1]
variants: [softmax, linear-angular]
measure: {{latency: false, memory: false}}
"""


def _experiment(tmp_path, checkpoint=None, save=False) -> Path:
    path = tmp_path / "ckpt.yaml"
    path.write_text(EXPERIMENT.format(checkpoint=f", checkpoint: {checkpoint}" if checkpoint else "",
                                      save=", save_checkpoint: true" if save else ""))
    return path


def test_save_checkpoint_keeps_each_seeds_weights_and_names_them_in_the_row(tmp_path):
    results = tmp_path / "results"
    done = CliRunner().invoke(main, ["sweep", str(_experiment(tmp_path, save=True)), "--results", str(results),
                                     "--device", "cpu"])
    assert done.exit_code == 0, done.output
    rows = store.read_rows(results / "ckpt", kind="trial")
    assert len(rows) == 4 and rows["checkpoint_path"].notna().all() and rows["init_checkpoint"].isna().all()
    assert rows["checkpoint_path"].nunique() == 4
    for row in rows.itertuples():
        state = checkpoints.read_state_dict(results / "ckpt" / row.checkpoint_path)
        model = _digits_model(row.variant, seed=99)
        assert models.load_checkpoint(model, results / "ckpt" / row.checkpoint_path)["missing"] == []
        splits = load_dataset("digits", seed=0)
        models.castle(model)
        assert train.evaluate(model, splits.test)["top1"] == pytest.approx(row.top1, abs=1e-9)
        assert set(state) == set(model.state_dict())


def test_model_checkpoint_starts_every_trial_from_the_file(tmp_path):
    source = _digits_model(seed=7)
    path = tmp_path / "start.safetensors"
    checkpoints.save_state_dict(source.state_dict(), path)
    results = tmp_path / "results"
    done = CliRunner().invoke(main, ["sweep", str(_experiment(tmp_path, checkpoint=path)), "--results",
                                     str(results), "--device", "cpu"])
    assert done.exit_code == 0, done.output
    rows = store.read_rows(results / "ckpt", kind="trial")
    assert (rows["init_checkpoint"] == str(path)).all() and len(rows) == 4


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist or is not a file"),
    ("not-a-state-dict", "could not be read as a state dict"),
    ("deeper-model", "it has 24 weight(s) the model lacks, e.g. 'blocks.1.attn.proj.bias' (another architecture?)"),
    ("wider-model", "weight(s) have another shape than the model's"),
])
def test_a_checkpoint_that_is_missing_or_does_not_fit_is_refused_up_front(tmp_path, case, message):
    path = tmp_path / "start.safetensors"
    if case == "not-a-state-dict":
        path.write_bytes(b"\x00garbage" * 10)
    elif case == "deeper-model":
        checkpoints.save_state_dict(_digits_model(depth=3).state_dict(), path)
    elif case == "wider-model":
        checkpoints.save_state_dict(_digits_model(embed_dim=32).state_dict(), path)
    experiment = _experiment(tmp_path, checkpoint=path)
    assert_sweep_refused(tmp_path, experiment, ["--device", "cpu"], "model.checkpoint", message)


def test_a_checkpoint_without_a_variants_new_weights_or_with_another_head_fits():
    teacher = _digits_model("softmax").state_dict()
    student = _digits_model("linear-angular")
    assert models.checkpoint_fit_problem(student, teacher) is None      # dconv: new
    other_head = models.create_model("vit_pico_patch2_8", "softmax", num_classes=3, in_chans=1, img_size=8, depth=1)
    assert models.checkpoint_fit_problem(other_head, teacher) is None   # a classifier started afresh
    report = models.load_state(student, teacher, "teacher")
    assert report["missing"] == ["blocks.0.attn.dconv.weight"] and report["unexpected"] == []
