"""The "did you mean" hint of every error about a misspelt name (torch-free: the command line and
the report use it before, or without, importing torch)."""
from __future__ import annotations

import difflib

__all__ = ["did_you_mean"]


def did_you_mean(word: str, candidates) -> str:
    """A ``"; did you mean 'x'?"`` suffix naming the closest candidate, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
