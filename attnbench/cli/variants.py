"""``attnbench variants``: the list of registered attention variants, one variant's options, and
the conformance checks (``--check``).
"""
from __future__ import annotations

import warnings

import click
from rich.table import Table

from attnbench import registry
from attnbench.cli._common import _variant_or_fail, console, fail, parse_key_values


@click.command("variants")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--check", is_flag=True, help="Run the conformance checks on each NAME [default: every variant].")
@click.option("--option", "option_items", multiple=True, metavar="KEY=VALUE",
              help="With one NAME: an option to describe or check it with (repeatable; values read as YAML).")
def variants_command(names: tuple, check: bool, option_items: tuple) -> None:
    """List every registered attention variant; with NAME, each option's type, default, allowed values and help."""
    from attnbench.variant import parse_options

    if option_items and len(names) != 1:
        fail(f"--option needs exactly one variant NAME, got {len(names)}")
    infos = [_variant_or_fail(name) for name in names]
    options = parse_key_values(option_items, "--option")
    if options:
        try:
            parse_options(infos[0].cls, options)
        except ValueError as err:
            fail(str(err))
    if not names:
        _print_variant_list(check)
        return
    failed = 0
    for name, info in zip(names, infos):
        console.print(_variant_detail(info, options, with_options=not check))
        if check:
            failed += _print_checks(name, options)
    if failed:
        fail(f"{failed} variant(s) failed conformance checks")


def _print_variant_list(check: bool) -> None:
    table, failed = _variant_list(check)
    console.print(table)
    if not check:
        console.print("attnbench variants NAME: the type, default, allowed values and help of each option",
                      highlight=False)
    if check and failed:
        fail(f"{failed} variant(s) failed to load or failed conformance checks")


def _variant_list(check: bool):
    """The table of every variant (with conformance results if ``check``) and how many failed."""
    from rich.text import Text

    infos, failed = [], 0
    for name in registry.list_variants():
        try:
            infos.append(registry.variant_info(name))
        except registry.VariantError as err:
            warnings.warn(str(err))
            failed += 1
    table = Table(title="attnbench variants")
    # Names are never folded: each column is as wide as its longest name.
    for column, values in (("name", [i.name for i in infos]), ("distribution", [i.distribution for i in infos])):
        table.add_column(column, no_wrap=True, min_width=max(map(len, values), default=0))
    if check:
        table.add_column("conformance", overflow="fold")
    else:
        table.add_column("description", overflow="fold", ratio=3)
        table.add_column("options", overflow="fold", ratio=2)
    for info in infos:
        row = [Text(info.name), Text(info.distribution)]
        if check:
            cell, passed = _conformance_cell(info.name)
            failed += not passed
            row.append(cell)
        else:
            row += [Text(info.description), Text(", ".join(spec.name for spec in info.options) or "-")]
        table.add_row(*row)
    return table, failed


def _variant_detail(info, options: dict, with_options: bool = True):
    """One variant: where it comes from, what it is, and (``with_options``) a table of its options."""
    from rich.console import Group
    from rich.text import Text

    head = Text.assemble((info.name, "bold"), f"  from distribution {info.distribution} ({info.target})")
    parts = [head, Text(info.description)]
    if options:
        parts.append(Text("with " + ", ".join(f"{k}={v!r}" for k, v in options.items())))
    if not with_options:
        return Group(*parts)
    if not info.options:
        parts.append(Text("no options of its own"))
        return Group(*parts)
    rows = [(spec.name, spec.kind, repr(spec.default), spec.allowed().replace(" | ", "\n") or "any",
             spec.help or "-") for spec in info.options]
    table = Table()
    # No column is narrower than its longest word, so names and values wrap between words, never inside.
    for index, column in enumerate(("option", "type", "default", "allowed", "help")):
        longest = max(len(word) for row in rows for word in row[index].split() or [""])
        table.add_column(column, overflow="fold", min_width=longest)
    for row in rows:
        table.add_row(*map(Text, row))
    parts.append(table)
    return Group(*parts)


def _print_checks(name: str, options: dict) -> int:
    """Run the conformance checks on one variant, print one row per check; 1 if any failed, else 0."""
    from rich.text import Text

    from attnbench.testing import run_checks  # lazy: pulls in timm and the counters

    results = run_checks(name, options)
    table = Table(title=f"conformance of {name}")
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("message", overflow="fold")
    for r in results:
        table.add_row(Text(r.check), Text("passed", "green") if r.passed else Text("FAILED", "red"),
                      Text(r.message))
    console.print(table)
    passed = sum(r.passed for r in results)
    console.print(f"{name}: {passed}/{len(results)} passed", highlight=False)
    return int(passed < len(results))


def _conformance_cell(name: str):
    """The conformance result of one variant as a table cell, and whether every check passed."""
    from rich.text import Text

    from attnbench.testing import run_checks  # lazy: pulls in timm and the counters

    results = run_checks(name)
    failures = [r for r in results if not r.passed]
    if not failures:
        return Text(f"{len(results)}/{len(results)} passed", "green"), True
    return Text("\n".join(f"{r.check}: {r.message}" for r in failures), "red"), False
