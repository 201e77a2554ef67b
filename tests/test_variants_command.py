"""`attnbench variants`: the list, one variant's options (`variants NAME`), and `--check NAME --option`."""
from __future__ import annotations

import dataclasses
import io
import re
from typing import Literal

import pytest
from click.testing import CliRunner
from rich.console import Console

from attnbench import AttentionVariant, registry
from attnbench.cli import main
from attnbench.cli import variants as cli_variants
from attnbench.variant import option_specs
from test_registry import BUILTINS

WIDTHS = (80, 100, 120)


def render(renderable, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


def cells(text: str) -> list[str]:
    """Every table cell line, stripped: text between box characters (and padding) on each line."""
    return [cell.strip() for line in text.splitlines() for cell in re.split(r"[│┃]", line) if cell.strip()]


def invoke(*args: str, width: int = 120):
    """Run the command with its console rendering at ``width`` columns."""
    saved = cli_variants.console
    cli_variants.console = Console(width=width, color_system=None)   # file=None: CliRunner's stdout at print time
    try:
        return CliRunner().invoke(main, list(args))
    finally:
        cli_variants.console = saved


@dataclasses.dataclass(frozen=True)
class _ToyOptions:
    mode: Literal["good", "bad-shape"] = dataclasses.field(default="good", metadata={"help": "bad-shape breaks it"})
    scale: float = dataclasses.field(default=1.0, metadata={"help": "output scale", "gt": 0, "le": 4})


class _ToyAttention(AttentionVariant):
    """A toy variant whose 'bad-shape' mode violates the contract."""

    Options = _ToyOptions

    def attend(self, q, k, v, attn_mask):
        out = v * self.options.scale
        return out.mean(dim=2) if self.options.mode == "bad-shape" else out

    def core_macs(self, num_tokens):
        return 0


@pytest.fixture
def toy(registered):
    return registered(_ToyAttention, "toy-cli-attn")


# ------------------------------------------------------------------------- variants NAME

@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", sorted(BUILTINS) + ["toy"])
def test_every_option_is_shown_whole_with_type_default_allowed_values_and_help(name, width, toy):
    name = toy if name == "toy" else name
    info = registry.variant_info(name)
    text = render(cli_variants._variant_detail(info, {}), width)
    assert max(map(len, text.splitlines())) <= width, text
    assert info.distribution in text and info.name in text
    found = cells(text)
    words = {w for cell in found for w in cell.split()}
    for spec in info.options:
        row = next(c for c in found if c.startswith(spec.name + " ") or c == spec.name)
        assert row == spec.name                      # the name whole, in its own cell
        assert spec.kind in found and repr(spec.default) in found
        for choice in spec.choices:                  # each allowed value whole on a line
            assert str(choice) in found, (choice, text)
        if spec.limits:
            assert spec.allowed() in found, text
        for word in spec.help.split():               # help wraps between words only
            assert word in words, (word, text)


def test_limits_and_help_are_what_the_options_declare(toy):
    text = render(cli_variants._variant_detail(registry.variant_info(toy), {}), 100)
    assert "in (0, 4]" in cells(text) and "output scale" in cells(text) and "bad-shape breaks it" in cells(text)
    castling = {s.name: s for s in option_specs(registry.get_variant("castling"))}
    assert castling["threshold"].allowed() == "in (0, 1)" and castling["gate_steps"].allowed() == ">= 1"
    assert all(spec.help for spec in castling.values())


@pytest.mark.parametrize("width", WIDTHS)
def test_the_list_never_cuts_a_name_or_distribution(width, toy):
    table, failed = cli_variants._variant_list(check=False)
    text = render(table, width)
    assert failed == 0 and max(map(len, text.splitlines())) <= width, text
    found = cells(text)
    for name in BUILTINS | {toy}:
        assert name in found, (name, text)
    assert registry.BUILTIN_DISTRIBUTION in found and registry.LOCAL_DISTRIBUTION in found


def test_variants_name_command(toy):
    done = invoke("variants", "castling", toy, width=100)
    assert done.exit_code == 0, done.output
    assert "mask_schedule" in done.output and "threshold_ramp" in done.output and "in (0, 4]" in done.output


# ------------------------------------------------------------------------- --check NAME --option

def test_check_one_variant_with_options_uses_the_options(toy):
    done = invoke("variants", "--check", toy, "--option", "scale=2")
    assert done.exit_code == 0, done.output
    assert re.search(r"toy-cli-attn: (\d+)/\1 passed", done.output), done.output
    done = invoke("variants", "--check", toy, "--option", "mode=bad-shape", "--option", "scale=0.5")
    assert done.exit_code == 2, done.output
    assert "FAILED" in done.output and "attend() returned" in done.output
    assert "error: 1 variant(s) failed conformance checks" in done.output


@pytest.mark.parametrize("args,message", [
    (("variants", "--check", "castling", "--option", "treshold=0.5"),
     "variant 'castling': unknown option 'treshold'; did you mean 'threshold'?"),
    (("variants", "--check", "castling", "--option", "threshold=2"),
     "variant 'castling': option 'threshold' got 2, expected a number in (0, 1)"),
    (("variants", "--check", "castling", "--option", "mask_schedule=gate_lin"),
     "expected one of 'none', 'fixed',"),
    (("variants", "--check", "castling", "--option", "threshold"), "--option 'threshold': expected KEY=VALUE"),
    (("variants", "--check", "--option", "threshold=0.5"), "--option needs exactly one variant NAME, got 0"),
    (("variants", "castling", "linear", "--option", "eps=1"), "--option needs exactly one variant NAME, got 2"),
    (("variants", "sofmax"), "unknown variant 'sofmax'; did you mean 'softmax'?"),
    (("variants", "--check", "[bold]x"), "unknown variant '[bold]x'"),   # shown as written, not as markup
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    done = invoke(*args)
    assert done.exit_code == 2, done.output
    lines = done.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.output
    assert "Traceback" not in done.output


def test_unknown_variant_says_a_plugin_may_be_missing():
    done = invoke("variants", "hydra-not-installed")
    assert "a plugin providing it may not be installed" in done.output
    assert f"installed variant distributions: {', '.join(registry.variant_distributions())}" in done.output
