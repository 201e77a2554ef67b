"""What produced a result row: the attnbench version, the variant's distribution, its resolved
options and the kernel implementation that ran, and the machine and libraries it ran on (what
makes a figure machine-specific). Sweeps and benchmarks take these columns from here."""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from typing import Any, Optional

import torch

from attnbench import allocator, kernels, measure, registry
from attnbench.variant import parse_options

__all__ = ["attnbench_version", "resolved_options", "variant_columns", "environment", "numerics", "cpu_model"]


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


def cpu_model() -> Optional[str]:
    """The CPU's model name from ``/proc/cpuinfo`` (or ``platform.processor()``), else None."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(*args: str, cwd: Optional[str] = None) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd or os.getcwd(), capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def environment(device: str = "cpu", threads: Optional[int] = None) -> dict[str, Any]:
    """Provenance of a measurement, as flat columns for a result row.

    Args:
        device: the device measured on (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        threads: torch threads used; default: the current ``torch.get_num_threads()``.

    Returns:
        ``torch_version``, ``timm_version``, ``python_version``, ``platform``, ``hostname``,
        ``device``, ``device_name`` (GPU name, or the CPU model on CPU), ``threads``,
        ``cpu_model``, ``cpu_count`` (cores this process may use), ``load_avg_1m`` (the
        system's 1-minute load average now: other work competing for the cores; None where
        unknown), ``git_commit`` and ``git_dirty`` of the repository holding the current
        directory (None outside one), ``allocator`` (:func:`attnbench.allocator.malloc_setting`),
        and :func:`numerics`.
    """
    device = str(device)
    cpu = cpu_model()
    if device.startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = cpu
    try:
        import timm
        timm_version = timm.__version__
    except ImportError:  # pragma: no cover - timm is a dependency
        timm_version = None
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return {
        "torch_version": torch.__version__,
        "timm_version": timm_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "device": device,
        "device_name": device_name,
        "threads": int(threads if threads is not None else torch.get_num_threads()),
        "cpu_model": cpu,
        "cpu_count": measure.default_threads(),
        "load_avg_1m": _load_average(),
        "git_commit": commit or None,
        "git_dirty": dirty,
        "allocator": allocator.malloc_setting(),
        **numerics(device),
    }


@functools.lru_cache(maxsize=None)
def _build_info() -> dict[str, str]:
    """The BLAS and oneDNN torch was built with, from its build description."""
    shown = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=([^,\s]+)", shown)
    mkl = re.search(r"Math Kernel Library Version ([^\n]+?)(?: for |\n)", shown)
    onednn = re.search(r"MKL-DNN (v[\d.]+)", shown)
    parts = [blas.group(1) if blas else None, f"MKL {mkl.group(1).strip()}" if mkl else None,
             f"oneDNN {onednn.group(1)}" if onednn else None]
    return {"blas": "; ".join(p for p in parts if p) or None}


def numerics(device: str = "cpu") -> dict[str, Any]:
    """What decides a run's arithmetic beyond the code and the seed: the CPU instruction set torch
    dispatches its kernels to (``cpu_capability``: AVX512, AVX2, DEFAULT...; ATEN_CPU_CAPABILITY can
    lower it), the BLAS and oneDNN it was built with (``blas``), torch's build (``torch_git``), and on
    a GPU the CUDA and cuDNN versions (``cuda_version``, ``cudnn_version``; null on the CPU, where
    they play no part). Two runs repeat bit for bit only where these, the thread count and the
    versions of torch and timm agree."""
    on_gpu = str(device).startswith("cuda") and torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if on_gpu and torch.backends.cudnn.is_available() else None
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), **_build_info(),
            "torch_git": getattr(torch.version, "git_version", None),
            "cuda_version": torch.version.cuda if on_gpu else None,
            "cudnn_version": str(cudnn) if cudnn is not None else None}
