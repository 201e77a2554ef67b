"""The ``attnbench`` command line. Each command parses its arguments and hands over to a module;
errors the user can fix are printed as one line, with a non-zero exit and no traceback.
"""
from __future__ import annotations

import sys
import warnings

import click
from rich.console import Console
from rich.table import Table

from attnbench import registry

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> "NoReturn":  # noqa: F821
    """Print ``error: message`` on stderr and exit 2."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


@click.group()
@click.version_option(package_name="attnbench")
def main() -> None:
    """Benchmark and ablate attention variants inside timm vision transformers."""
    warnings.showwarning = _show_warning


@main.command("variants")
def variants_command() -> None:
    """List every registered attention variant with its options."""
    table = Table(title="attnbench variants", show_lines=False)
    for column in ("name", "distribution", "options (defaults)", "description"):
        table.add_column(column, overflow="fold")
    for name in registry.list_variants():
        try:
            info = registry.variant_info(name)
        except registry.VariantError as err:
            warnings.warn(str(err))
            continue
        options = "\n".join(spec.describe() for spec in info.options) or "-"
        table.add_row(name, info.distribution, options, info.description)
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
