"""What every command shares: the consoles, ``fail()`` (one line on stderr, exit 2), the warnings
printer, and ``KEY=VALUE`` parsing.
"""
from __future__ import annotations

import re
import sys
from typing import NoReturn

from rich.console import Console
from rich.markup import escape

from attnbench import registry
from attnbench.terminal import printable

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit 2 (the message is shown as written, never as markup,
    its control characters escaped)."""
    err_console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err_console.print(f"[yellow]warning:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)


def parse_key_values(items, what: str) -> dict:
    """``["threshold=0.5", "residual=none"]`` -> ``{"threshold": 0.5, "residual": "none"}``.

    Values are read as YAML scalars (``0.5``, ``1e-6``, ``true``, ``head``); ``what`` names the
    option in the error: one line, exit 2.
    """
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"{what} '{item}': expected KEY=VALUE")
        parsed[key.strip()] = _scalar(value.strip())
    return parsed


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _scalar(text: str):
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMBER.fullmatch(value):   # YAML 1.1 reads 1e-6 as a string
        return float(value)
    return value


def _variant_or_fail(name: str):
    try:
        return registry.variant_info(name)
    except registry.VariantError as err:
        fail(str(err))


def parse_run(spec: str) -> tuple[str, dict]:
    """``castling:mask_schedule=gate_linear,schedule_end=0.5`` -> (``castling``, options); a qualified
    ``dist:name`` keeps its colon (options follow the last colon before the first ``=``).
    """
    equals = spec.find("=")
    if equals < 0:
        return spec.strip(), {}
    colon = spec.rfind(":", 0, equals)
    if colon < 0:
        fail(f"run '{spec}': expected VARIANT or VARIANT:KEY=VALUE,...")
    return spec[:colon].strip(), parse_key_values(filter(None, spec[colon + 1:].split(",")), f"run '{spec}'")


def build_model(arch: str, variant: str, options: dict, seed: int, splits, model_options: dict,
                data_options: dict):
    """A model of ``variant`` for ``splits`` built as the command line asks, or one line and exit 2:
    a bad model option, or an image that is not a whole number of patches."""
    from attnbench import models
    from attnbench.experiment_check import patch_problem

    try:
        model = models.create_model(arch, variant, options, seed=seed, **splits.model_kwargs(), **model_options)
    except models.ModelError as err:
        fail(str(err))
    except TypeError as err:   # timm's constructor refused a keyword
        fail(f"--model-option: {err}")
    if problem := patch_problem(model, arch, splits.img_size):
        fail(f"--data-option img_size: {problem}" if "img_size" in data_options else f"--arch: {problem}")
    return model
