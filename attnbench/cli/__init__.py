"""The ``attnbench`` command line. Each command parses its arguments and hands over to a module;
errors the user can fix are printed as one line, with a non-zero exit and no traceback.

One module a command (``variants``, ``train``, ``sweep``, ``bench``, ``report``); ``_common`` holds
the consoles, ``fail()`` and ``KEY=VALUE`` parsing, ``dataclass_options`` the dataclass -> Click
options machinery of ``train``. Their names are re-exported here; a test that replaces one (say
``console``) must patch the module that uses it, e.g. ``attnbench.cli.variants``.
"""
from __future__ import annotations

import warnings

import click

from attnbench import allocator, kernels
from attnbench.cli._common import (_NUMBER, _scalar, _show_warning, _variant_or_fail, console, err_console, fail,
                                   parse_key_values)
from attnbench.cli.bench import bench_command
from attnbench.cli.dataclass_options import _click_type, _dataclass_field_docs, _dataclass_options, _NoneOr, _Yaml
from attnbench.cli.report import _print_tables, _report_plots, report_command
from attnbench.cli.sweep import (RichSweepDisplay, _missing_plugin_hint, _print_plan, _refuse, _run_sweep,
                                 _run_workers, sweep_command)
from attnbench.cli.train import _given, _parse_run, _TrainCommand, train_command
from attnbench.cli.variants import (_conformance_cell, _print_checks, _print_variant_list, _variant_detail,
                                    _variant_list, variants_command)

__all__ = [   # the names ``attnbench.cli`` had before it became a package
    "main", "console", "err_console", "fail", "parse_key_values", "_show_warning", "_NUMBER", "_scalar",
    "_variant_or_fail", "variants_command", "_print_variant_list", "_variant_list", "_variant_detail",
    "_print_checks", "_conformance_cell", "_dataclass_field_docs", "_NoneOr", "_Yaml", "_click_type",
    "_dataclass_options", "_TrainCommand", "_given", "_parse_run", "train_command", "sweep_command",
    "_missing_plugin_hint", "_refuse", "_run_sweep", "_run_workers", "_print_plan", "RichSweepDisplay",
    "bench_command", "report_command", "_print_tables", "_report_plots",
]


@click.group()
@click.version_option(package_name="attnbench")
def main() -> None:
    """Benchmark and ablate attention variants inside timm vision transformers."""
    warnings.showwarning = _show_warning
    try:
        kernels.requested()   # a bad ATTNBENCH_OPS is one line now, not a traceback mid-sweep
    except ValueError as err:
        fail(str(err))
    allocator.tune_malloc()   # training steps stop faulting their buffers back in (ATTNBENCH_MALLOC=system: off)


for _command in (variants_command, train_command, sweep_command, bench_command, report_command):
    main.add_command(_command)
