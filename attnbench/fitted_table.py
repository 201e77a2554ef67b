"""Rich tables that fit the terminal: columns chosen by priority, no value broken across lines.

A :class:`FittedTable` decides at render time, from the width Rich gives it, which columns to
show: the first ``required`` columns of the priority order always, then each further column in
priority order if the table still fits (a wide column that does not fit is skipped, a narrower
one after it may still fit). Cells never wrap; a header may span lines (``"\\n"`` in it). Below
the table come a legend for the shown columns and a line naming the columns left out.
``wide=True`` shows every column and lets Rich wrap them as it must.

Cells and headers are plain text: shown exactly as written (no Rich markup is interpreted, control
characters escaped: :func:`attnbench.terminal.printable`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from attnbench.terminal import printable

__all__ = ["FittedColumn", "FittedTable"]

_NATURAL = 100_000   # a width no table reaches: measuring at it gives the unwrapped width


@dataclasses.dataclass(frozen=True)
class FittedColumn:
    """One column: its name (as the footer and ``--columns`` call it), header and cells."""

    name: str
    header: str
    cells: Sequence[str]
    justify: str = "right"


@dataclasses.dataclass
class FittedTable:
    """A Rich renderable: ``columns`` (in display order) that fit, picked by ``priority``.

    Args:
        priority: column names, most important first; columns not named come last, in order.
        required: how many of the first priority columns are always shown.
        legend: text below the table for the shown column names ("" for none); wrapped as prose.
        omitted_note: text naming the left-out column names, given them and the width.
        section_every: a blank rule after every this many rows (when there are more), to keep
            long tables scannable.
    """

    columns: Sequence[FittedColumn]
    title: str = ""
    priority: Sequence[str] = ()
    required: int = 1
    wide: bool = False
    legend: Optional[Callable[[list[str]], str]] = None
    omitted_note: Optional[Callable[[list[str], int], str]] = None
    section_every: int = 5

    def _ranked(self) -> list[FittedColumn]:
        rank = {name: i for i, name in enumerate(self.priority)}
        return sorted(self.columns, key=lambda c: rank.get(c.name, len(rank)))

    def fit(self, console: Console, width: int) -> list[FittedColumn]:
        """The columns shown at ``width`` (all of them when ``wide``), in display order."""
        if self.wide:
            return list(self.columns)
        ranked = self._ranked()
        chosen = ranked[:self.required]
        options = console.options.update_width(_NATURAL)
        for column in ranked[self.required:]:
            trial = chosen + [column]
            if Measurement.get(console, options, self.table(trial)).maximum <= width:
                chosen = trial
        keep = {id(c) for c in chosen}
        return [c for c in self.columns if id(c) in keep]

    def table(self, columns: Sequence[FittedColumn]) -> Table:
        """A Rich table of ``columns``: cells unwrapped unless ``wide``."""
        table = Table(title=Text(printable(self.title)) if self.title else None, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                      title_justify="left")
        for column in columns:
            table.add_column(Text(printable(column.header, newlines=True)), justify=column.justify, no_wrap=not self.wide,
                             overflow="fold" if self.wide else "ellipsis")
        rows = list(zip(*(c.cells for c in columns))) if columns else []
        for i, cells in enumerate(rows, 1):
            table.add_row(*(Text(printable(cell, newlines=True)) for cell in cells),
                          end_section=i % self.section_every == 0 and i < len(rows))
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        shown = self.fit(console, options.max_width)
        yield self.table(shown)
        legend = self.legend([c.name for c in shown]) if self.legend else ""
        if legend:
            yield Text(printable(legend))
        names = {c.name for c in shown}
        omitted = [c.name for c in self._ranked() if c.name not in names]
        if omitted and self.omitted_note:
            yield Text(self.omitted_note(omitted, options.max_width), style="dim")
