"""`attnbench train`: what `python -m attnbench.train` did, as a Click command with the others' conventions."""
from __future__ import annotations

import dataclasses
import json
from typing import Literal, Optional

import click
import pytest
from click.testing import CliRunner

from attnbench import train
from attnbench.cli import _common as cli_common
from attnbench.cli import main
from attnbench.cli import dataclass_options
from attnbench.train import TrainConfig

FAST = ["--max-steps", "2", "--model-option", "depth=1", "--no-progress", "--device", "cpu", "--num-threads", "1"]


def invoke(*args: str):
    return CliRunner().invoke(main, ["train", *args])


def test_trains_each_run_and_writes_every_result(tmp_path):
    out = tmp_path / "runs.json"
    done = invoke("softmax", "castling:mask_schedule=gate_step,schedule_end=0.5", *FAST, "--lr", "1e-3",
                  "--no-deterministic", "--json", str(out))
    assert done.exit_code == 0, done.output
    assert "switch cost" in done.output and "mask_schedule=gate_step" in done.output
    results = json.loads(out.read_text())
    assert [r["run"] for r in results] == ["softmax", "castling:mask_schedule=gate_step,schedule_end=0.5"]
    assert results[1]["options"] == {"mask_schedule": "gate_step", "schedule_end": 0.5}
    config = results[0]["config"]
    # given options reach TrainConfig; the rest keep its defaults
    assert config["max_steps"] == 2 and config["lr"] == 1e-3 and config["deterministic"] is False
    assert config["epochs"] == TrainConfig.epochs and config["clip_grad"] == TrainConfig.clip_grad
    assert all(r["status"] == "ok" and r["steps"] == 2 for r in results)


def test_a_diverged_run_exits_1_and_is_named(tmp_path):
    done = invoke("softmax", *FAST, "--lr", "1e30", "--clip-grad", "none")
    assert done.exit_code == 1, done.output
    assert "softmax: failed:" in done.output and "Traceback" not in done.output


@pytest.mark.parametrize("args,message", [
    (["sofmax"], "unknown variant 'sofmax'; did you mean 'softmax'?"),
    (["castling:treshold=0.1"], "variant 'castling': unknown option 'treshold'; did you mean 'threshold'?"),
    (["castling:threshold=7"], "option 'threshold' got 7, expected a number in (0, 1)"),
    (["castling:threshold"], "unknown variant 'castling:threshold'"),   # read as distribution:variant
    (["threshold=0.1"], "run 'threshold=0.1': expected VARIANT or VARIANT:KEY=VALUE"),
    (["--lr", "-1"], "TrainConfig: lr must be a finite number > 0"),
    (["--device", "gpu"], "--device 'gpu': "),
    (["--data-option", "img_sz=8"], "dataset 'digits': unknown option 'img_sz'; did you mean 'img_size'?"),
    (["--dataset", "digitz"], "unknown dataset 'digitz'"),
    (["--model-option", "dept=1", "--max-steps", "1"], "--model-option: "),
    (["--arch", "no_such_vit", "--max-steps", "1"], "unknown model architecture 'no_such_vit'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    done = invoke(*args)
    assert done.exit_code == 2, done.output
    errors = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.output
    assert "Traceback" not in done.output and "switch cost" not in done.output   # nothing trained


def test_click_rejects_a_badly_typed_config_option_with_exit_2():
    done = invoke("--epochs", "many")
    assert done.exit_code == 2 and "'many' is not a valid integer" in done.output


def test_every_train_config_field_is_an_option_with_its_doc_and_default():
    help_text = " ".join(invoke("--help").output.split())
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name.replace('_', '-')}" in help_text, field.name
    assert "peak learning rate, reached after the warm-up. [default: 0.002]" in help_text
    assert "--checkpoint [best_val|last]" in help_text and "--clip-grad FLOAT|NONE" in help_text


def test_options_follow_the_dataclass_fields_and_their_types():
    @dataclasses.dataclass
    class Config:
        """A config.

        Attributes:
            precision: number format
                of the forward pass.
            augment: on or off.
            crop, flip: two fields sharing one line.
            extra: any other type, read as YAML.
        """

        precision: Literal["fp32", "bf16"] = "fp32"
        augment: bool = False
        crop: Optional[int] = None
        flip: float = 0.5
        extra: dict = dataclasses.field(default_factory=dict)
        undocumented: str = "x"
        maybe: Optional[bool] = None

    options = {o.name: o for o in dataclass_options._dataclass_options(Config)}
    assert list(options) == ["precision", "augment", "crop", "flip", "extra", "undocumented", "maybe"]
    assert options["precision"].help == "number format of the forward pass."
    assert options["crop"].help == options["flip"].help == "two fields sharing one line."
    assert options["undocumented"].help == "Config.undocumented"
    assert isinstance(options["precision"].type, click.Choice) and options["augment"].is_flag
    convert = {name: (lambda text, o=o: o.type.convert(text, None, None)) for name, o in options.items()}
    assert convert["crop"]("none") is None and convert["crop"]("3") == 3
    assert convert["extra"]("{a: 1}") == {"a": 1} and options["extra"].default == {}
    assert convert["maybe"]("no") is False and convert["maybe"]("none") is None


def test_run_specs_and_key_values():
    assert cli_common.parse_run("castling") == ("castling", {})
    assert cli_common.parse_run("attnbench:castling") == ("attnbench:castling", {})
    assert cli_common.parse_run("attnbench:castling:threshold=0.1,mask_schedule=none") == \
        ("attnbench:castling", {"threshold": 0.1, "mask_schedule": "none"})
    assert cli_common.parse_key_values(["eps=1e-6", "flag=true", "n=3", "s=head"], "--option") == \
        {"eps": 1e-6, "flag": True, "n": 3, "s": "head"}


def test_the_argparse_entry_is_gone():
    assert not hasattr(train, "main")


def test_precision_is_a_choice_of_the_typed_config():
    shown = invoke("--help")
    assert "--precision [float32|bfloat16|float16]" in " ".join(shown.output.split())
    refused = invoke("--precision", "float64")
    assert refused.exit_code == 2 and "float64" in refused.output and "Traceback" not in refused.output
