"""Kernels behind the built-in variants, one module per concept, the plain reference beside the fast path.

Which implementation runs is attnbench's switch (:mod:`attnbench.kernels`): ``fast`` (default),
``reference`` (the plain formulations, step by step as the spec writes them) or ``compile`` (the
fast paths under ``torch.compile`` where an op offers it, the castled linear-angular core as
hand-written C on a CPU, else ``fast``; if compiling fails it warns once and runs the next).
The names below are the ops' short-hands for it.
"""
from __future__ import annotations

from attnbench import kernels
from attnbench.kernels import IMPLEMENTATIONS as IMPLS
from attnbench.kernels import requested as get_impl
from attnbench.kernels import use as use_impl

__all__ = ["IMPLS", "get_impl", "set_impl", "use_impl"]


def set_impl(name: str) -> str:
    """Set this process's default implementation; return the one requested before."""
    previous = kernels.requested()
    kernels.set_process_default(name)
    return previous
