"""What produced a result row: the attnbench version, the variant's distribution, its resolved
options and the kernel implementation that ran. Sweeps and benchmarks take these columns from here."""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
from typing import Any, Optional

from attnbench import kernels, registry
from attnbench.variant import parse_options

__all__ = ["attnbench_version", "resolved_options", "variant_columns"]


@functools.lru_cache(maxsize=1)
def attnbench_version() -> str:
    """The installed distribution's version (the package's ``__version__`` when run from a source tree)."""
    try:
        return importlib.metadata.version("attnbench")
    except importlib.metadata.PackageNotFoundError:
        from attnbench import __version__

        return __version__


def resolved_options(variant: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of ``variant`` as it runs with ``options``: presets and defaults filled in."""
    return dataclasses.asdict(parse_options(registry.get_variant(variant), options))


def variant_columns(variant: str, options: dict[str, Any], kernel: Optional[str] = None) -> dict[str, Any]:
    """The provenance columns of a row about ``variant`` run with ``options``.

    Args:
        variant: registered name (``"dist:name"`` allowed).
        options: the options given; defaults are added.
        kernel: the implementation requested (default: :func:`attnbench.kernels.requested` now).
    """
    info = registry.variant_info(variant)
    asked = kernel or kernels.requested()
    return {
        "variant": variant,
        "options": json.dumps(resolved_options(variant, options), sort_keys=True),
        "attnbench_version": attnbench_version(),
        "variant_distribution": info.distribution,
        "variant_distribution_version": info.version,
        "kernel_requested": asked,
        "kernel_implementation": kernels.implementation_of(info.cls, asked),
    }
