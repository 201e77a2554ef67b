"""The ``attnbench`` command line. Each command parses its arguments and hands over to a module;
errors the user can fix are printed as one line, with a non-zero exit and no traceback.

One module a command (``variants``, ``train``, ``sweep``, ``bench``, ``report``, ``rerun``, ``export``); ``_common`` holds
the consoles, ``fail()`` and ``KEY=VALUE`` parsing, ``dataclass_options`` the dataclass -> Click
options machinery of ``train``. Only ``main`` is public; a test that replaces a helper (say
``console``) patches the module that uses it, e.g. ``attnbench.cli.variants``.
"""
from __future__ import annotations

import warnings

import click

from attnbench import allocator, kernels
from attnbench.cli._common import _show_warning, fail
from attnbench.cli.bench import bench_command
from attnbench.cli.export import export_command
from attnbench.cli.report import report_command
from attnbench.cli.rerun import rerun_command
from attnbench.cli.sweep import sweep_command
from attnbench.cli.train import train_command
from attnbench.cli.variants import variants_command

__all__ = ["main"]


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


for _command in (variants_command, train_command, sweep_command, bench_command, report_command, rerun_command,
                 export_command):
    main.add_command(_command)
