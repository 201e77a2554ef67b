"""Which kernel implementation attention variants run: one switch, owned by the framework.

Variants that offer several implementations of the same numbers list them in
:attr:`attnbench.AttentionVariant.kernel_implementations` and dispatch on :func:`requested`;
the framework asks :func:`implementation_of` what really ran and stores it with every row.

- ``fast``: the fast paths (the default);
- ``reference``: the plain formulations, step by step as the spec writes them (tests compare);
- ``compile``: the fast paths under ``torch.compile`` where the variant offers it, or compiled
  code of its own (the castled linear-angular core's C, :mod:`attnbench.native`); a variant
  whose compiling fails runs ``fast`` and says so through :meth:`AttentionVariant.kernel_ran`.

The choice, innermost first: :func:`use` (a context, for this thread or task), the process
default (:func:`set_process_default`, for worker processes that own their process), the
environment variable ``ATTNBENCH_OPS`` (read when asked, not at import), then ``fast``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:  # pragma: no cover
    from attnbench.variant import AttentionVariant

__all__ = ["IMPLEMENTATIONS", "DEFAULT", "SINGLE", "ENV_VAR", "check", "requested", "use", "set_process_default",
           "implementation_of"]

IMPLEMENTATIONS = ("fast", "reference", "compile")
DEFAULT = "fast"
#: Recorded for a variant that offers no alternative implementations (whatever was requested).
SINGLE = "n/a"
ENV_VAR = "ATTNBENCH_OPS"

_context: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("attnbench_kernels", default=None)
_process_default: Optional[str] = None


def check(name: str, source: str = "kernel implementation") -> str:
    """``name`` if it is one of :data:`IMPLEMENTATIONS`, else ValueError naming ``source``."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{source} {name!r} unknown (known: {', '.join(IMPLEMENTATIONS)})")
    return name


def requested() -> str:
    """The implementation asked for now (context, process default, ``ATTNBENCH_OPS``, ``fast``).

    Raises:
        ValueError: ``ATTNBENCH_OPS`` names no implementation.
    """
    name = _context.get() or _process_default
    if name is not None:
        return name
    return check(os.environ.get(ENV_VAR) or DEFAULT, f"environment variable {ENV_VAR}:")


@contextlib.contextmanager
def use(name: str) -> Iterator[str]:
    """``with kernels.use("reference"): ...`` runs the block (this thread or task) with that implementation."""
    token = _context.set(check(name))
    try:
        yield name
    finally:
        _context.reset(token)


def set_process_default(name: Optional[str]) -> Optional[str]:
    """Set this process's default (None: back to ``ATTNBENCH_OPS``); return the previous one.

    Meant for processes that attnbench starts for one job (timing and memory workers), where
    the work runs outside any :func:`use` block.
    """
    global _process_default
    previous, _process_default = _process_default, (None if name is None else check(name))
    return previous


def implementation_of(variant: "type[AttentionVariant]", asked: Optional[str] = None) -> str:
    """What ``variant`` runs (or ran, in this process) when ``asked`` (default :func:`requested`) is asked for:
    :data:`SINGLE` for a variant with one implementation."""
    return variant.kernel_ran(asked or requested())
