"""Kernels behind the built-in variants, one module per concept, the plain reference beside the fast path.

Which implementation runs is one process-wide switch, :func:`set_impl` / :func:`use_impl`, or
the environment variable ``ATTNBENCH_OPS`` (default ``fast``):

- ``fast``: the fast paths (default);
- ``reference``: the plain formulations, step by step as the spec writes them (tests compare);
- ``compile``: the fast paths under ``torch.compile`` where an op offers it (linear-angular),
  else ``fast``; if compiling fails it warns once and runs ``fast``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

__all__ = ["IMPLS", "get_impl", "set_impl", "use_impl"]

IMPLS = ("fast", "reference", "compile")


def _check_impl(name: str) -> str:
    if name not in IMPLS:
        raise ValueError(f"attnbench_variants.ops implementation {name!r} unknown (known: {', '.join(IMPLS)})")
    return name


_impl = _check_impl(os.environ.get("ATTNBENCH_OPS", "fast"))


def get_impl() -> str:
    """The implementation the ops dispatch to now."""
    return _impl


def set_impl(name: str) -> str:
    """Select ``fast``, ``reference`` or ``compile`` for every op; return the previous choice."""
    global _impl
    previous, _impl = _impl, _check_impl(name)
    return previous


@contextlib.contextmanager
def use_impl(name: str) -> Iterator[None]:
    """``with use_impl("reference"): ...`` runs the block with that implementation."""
    previous = set_impl(name)
    try:
        yield
    finally:
        set_impl(previous)
