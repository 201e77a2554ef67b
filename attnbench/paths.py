"""Output paths checked before any work: a folder or file the run will write must be (or be able to
become) one, so that a bad ``--results``, ``--out`` or ``--json`` is one line up front, never an
error after training (torch-free: ``report`` checks its outputs with these too)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["folder_problem", "file_problem"]


def folder_problem(folder: Path, purpose: str) -> Optional[str]:
    """Why ``folder`` cannot be (or become) a writable folder, or None: the nearest part of it
    that exists must be a folder, and writable (checked before any work, not after training)."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                return f"'{path}' is a file; expected a folder (or a path that does not exist yet) {purpose}"
            if not os.access(path, os.W_OK | os.X_OK):
                return f"'{path}' is not writable"
            return None
    return None


def file_problem(file: Path, purpose: str) -> Optional[str]:
    """Why ``file`` cannot be written (it is a folder, or its folder cannot be one), or None."""
    if file.is_dir():
        return f"'{file}' is a folder; expected a file name {purpose}"
    if file.exists() and not os.access(file, os.W_OK):
        return f"'{file}' is not writable"
    return folder_problem(file.parent, purpose)
