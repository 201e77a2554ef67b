"""``attnbench report``: tables, Pareto fronts and plots from a result store."""
from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from attnbench.cli._common import _show_warning, console, err_console, fail


@click.command("report")
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(path_type=Path),
              help="Result store to read (every Parquet file below it).")
@click.option("--study", "studies", multiple=True, help="Only this study (repeatable).")
@click.option("--label", "labels", multiple=True, help="Only this configuration label (repeatable).")
@click.option("--variant", "variants", multiple=True, help="Only this variant (repeatable).")
@click.option("--filter", "filters", multiple=True,
              help="Keep rows matching a pandas query on the summary's columns, e.g. 'macs<1e8' (repeatable).")
@click.option("--sort", default=None, help="Sort by this column [default: study, then top-1 best first].")
@click.option("--desc", is_flag=True, help="Sort descending.")
@click.option("--columns", default=None,
              help="Comma-separated columns [default: the paper table, as many as fit the terminal; csv/json: all].")
@click.option("--wide", is_flag=True, help="Table: show every column whatever the terminal width (cells may wrap).")
@click.option("--baseline", default=None, help="Configuration label to compare with [default: softmax, if present].")
@click.option("--format", "fmt", default="table", show_default=True,
              type=click.Choice(["table", "csv", "markdown", "json"]))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the output here, not to stdout.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the PNG plots [default: RESULTS/plots].")
@click.option("--no-plots", is_flag=True, help="Write no PNG plots.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write one HTML page with the tables and the plots embedded.")
@click.option("--strict", is_flag=True,
              help="Fail on a result file that cannot be read, instead of skipping it with a warning.")
def report_command(results_dir: Path, studies, labels, variants, filters, sort, desc, columns, wide, baseline, fmt,
                   out, plots_dir, no_plots, html_file, strict) -> None:
    """Tables, Pareto fronts and plots: one row per configuration, mean ± std over seeds."""
    from attnbench.paths import file_problem, folder_problem
    from attnbench.results import report

    for option, problem in (("--out", out is not None and file_problem(out, "for --out")),
                            ("--html", html_file is not None and file_problem(html_file, "for --html")),
                            ("--plots", plots_dir is not None and not no_plots and folder_problem(plots_dir,
                                                                                                  "for the plots"))):
        if problem:
            fail(f"{option}: {problem}")
    try:
        loaded = report.load_store(results_dir, strict=strict,
                                   on_skip=lambda skipped: _show_warning(skipped, UserWarning, "", 0))
        trials, bench = loaded.trials, loaded.bench
        if loaded.skipped:
            _show_warning(f"{len(loaded.skipped)} result file(s) under '{results_dir}' skipped (--strict to fail "
                          f"instead)", UserWarning, "", 0)
        if trials.empty and fmt != "table":
            raise report.ReportError(f"no trial rows under '{results_dir}' to export (only benchmark rows)")
        frame = trials if trials.empty else report.select(report.summarize(trials, baseline), studies, labels,
                                                          variants, filters, sort, desc)
        chosen = report.check_view_columns(frame, columns.split(",")) if columns and not trials.empty else None
    except report.ReportError as err:
        fail(str(err))
    shown = trials if trials.empty else trials[trials["study"].isin(frame["study"])]
    for warning in [] if trials.empty else report.consistency_warnings(shown) + report.baseline_warnings(frame):
        _show_warning(warning, UserWarning, "", 0)
    notes = err_console if fmt != "table" and out is None else console
    if trials.empty:
        notes.print(escape(f"no trial rows under '{results_dir}': no table, plots from benchmark rows only"))
    elif frame.empty:
        fail("no configuration matches --study/--label/--variant/--filter")
    elif fmt == "table":
        _print_tables(report.rich_tables(frame, chosen or report.DEFAULT_COLUMNS, wide=wide), out)
    elif out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.export(frame, fmt, chosen))
    else:
        click.echo(report.export(frame, fmt, chosen), nl=False)
    if out is not None:
        notes.print(escape(f"{fmt}: {out}"), highlight=False)
    bench = bench[bench["variant"].isin(variants)] if variants and "variant" in bench else bench
    _report_plots(frame, trials, bench, None if no_plots else plots_dir or results_dir / "plots", html_file,
                  chosen or report.DEFAULT_COLUMNS, notes)


def _print_tables(tables: list, out) -> None:
    if out is None:
        for table in tables:
            console.print(table)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle:
        Console(file=handle, width=200).print(*tables)


def _report_plots(frame, trials, bench, plots_dir, html_file, columns, notes) -> None:
    """Write the PNG plots to ``plots_dir`` (None: none) and the HTML page; say where."""
    import tempfile

    from attnbench.results import plots, report

    if plots_dir is None and html_file is None:
        return
    with tempfile.TemporaryDirectory() as scratch:
        images = plots.write_plots(frame, trials, bench, plots_dir or Path(scratch))
        if html_file is not None:
            html_file.parent.mkdir(parents=True, exist_ok=True)
            html_file.write_text(report.html_page(frame, columns, images))
            notes.print(escape(f"html: {html_file}"), highlight=False)
    if plots_dir is not None:
        names = ", ".join(p.name for p in images) or "none (no data to plot)"
        notes.print(escape(f"plots in {plots_dir}/: {names}"), highlight=False)
