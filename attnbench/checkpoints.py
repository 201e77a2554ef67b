"""Model checkpoints on disk: one state dict a file, written atomically, read back exactly.

Format by suffix: ``.safetensors`` (safetensors, a dependency: no pickled code, the default) or
``.pt``/``.pth`` (``torch.save`` of a plain state dict, read with ``weights_only=True``).
:func:`read_state_dict` also accepts timm-style files: a state dict wrapped under ``state_dict``,
``model``, ``state_dict_ema`` or ``model_ema``, keys prefixed with ``module.`` (DataParallel).
:func:`match_state` says which keys of a checkpoint fit a model (the same name and shape), which
of the model's are new and which of the checkpoint's are left over, from shapes alone (a model on
the meta device will do), so a run can refuse a checkpoint that does not fit before it trains.
"""
from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

__all__ = ["CheckpointError", "SUFFIXES", "default_suffix", "check_path", "save_state_dict", "read_state_dict",
           "StateMatch", "match_state"]

#: The suffixes a checkpoint file may have, by format.
SUFFIXES = (".safetensors", ".pt", ".pth")
_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")   # timm's train script and others

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, read or used: one line naming the file."""


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:   # a dependency of attnbench (and timm); absent only in a broken install
        return None
    return safetensors.torch


def default_suffix() -> str:
    """``.safetensors`` where safetensors is installed (it is a dependency), else ``.pt``."""
    return ".safetensors" if _safetensors() is not None else ".pt"


def check_path(path: PathLike) -> Optional[str]:
    """Why a checkpoint cannot be written to ``path`` (a problem, one line), or None."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        return f"'{path}': a checkpoint file ends in {', '.join(SUFFIXES)}"
    if path.suffix == ".safetensors" and _safetensors() is None:
        return f"'{path}': safetensors is not installed; use a .pt file"
    if path.is_dir():
        return f"'{path}' is a folder; expected a file name"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"'{parent}' is a file; expected a folder for the checkpoint"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"'{parent}' is not writable"
            break
    return None


def save_state_dict(state: Mapping[str, torch.Tensor], path: PathLike) -> Path:
    """Write ``state`` (CPU copies of its tensors) to ``path``, atomically: a reader never sees half a file.

    Raises:
        CheckpointError: an unknown suffix, or the file cannot be written.
    """
    path = Path(path)
    problem = check_path(path)
    if problem:
        raise CheckpointError(problem)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name beside it, created as open() creates files (the umask's mode, not owner-only)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        if path.suffix == ".safetensors":
            _safetensors().save_file(tensors, str(scratch))
        else:
            torch.save(tensors, scratch)
        os.chmod(scratch, 0o666 & ~_umask())   # safetensors creates its file owner-only; open() would not
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's umask, read without setting it (os.umask can only be read by changing it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (on the CPU), unwrapped and without ``module.`` prefixes.

    Raises:
        CheckpointError: no such file, or not a state dict of tensors (one line).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist or is not a file")
    try:
        if path.endswith(".safetensors"):
            if _safetensors() is None:
                raise CheckpointError(f"checkpoint '{path}': safetensors is not installed")
            state = _safetensors().load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader error is one line about the file
        text = " ".join(str(err).split())[:200]
        raise CheckpointError(f"checkpoint '{path}' could not be read as a state dict: {type(err).__name__}: "
                              f"{text}") from None
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint '{path}' holds no state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


@dataclasses.dataclass(frozen=True)
class StateMatch:
    """How a checkpoint's keys meet a model's (lists of keys, sorted).

    Attributes:
        loaded: in both, with the same shape: these are loaded.
        new: the model's keys the checkpoint lacks (they keep the model's initialisation).
        unused: the checkpoint's keys the model does not have.
        mismatched: in both with different shapes (not loaded).
    """

    loaded: tuple[str, ...]
    new: tuple[str, ...]
    unused: tuple[str, ...]
    mismatched: tuple[str, ...]

    def as_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}


def match_state(model_state: Mapping[str, torch.Tensor], checkpoint: Mapping[str, torch.Tensor]) -> StateMatch:
    """Which keys of ``checkpoint`` fit ``model_state`` (shapes only: meta tensors are fine)."""
    mismatched = sorted(k for k, v in checkpoint.items() if k in model_state and model_state[k].shape != v.shape)
    loaded = sorted(k for k in checkpoint if k in model_state and k not in mismatched)
    return StateMatch(tuple(loaded), tuple(sorted(k for k in model_state if k not in checkpoint)),
                      tuple(sorted(k for k in checkpoint if k not in model_state)), tuple(mismatched))
