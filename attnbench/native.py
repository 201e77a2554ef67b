"""Hand-written C kernels: built on first use with the machine's C compiler, cached, loaded with ctypes.

A kernel is a C source file shipped with the package that uses it; :func:`load_library` compiles
it once per machine and set of ``-D`` constants (so a loop over a head of width 64 is a fixed
loop the compiler vectorises) and returns the loaded library. Like ``torch.compile``'s Inductor,
this needs a C compiler at run time (``$CC``, else ``cc``) with OpenMP; where building fails, the
caller gets a :class:`NativeBuildError` in one line and runs its other path.

The libraries live in ``$ATTNBENCH_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/attnbench/native``
(``~/.cache/attnbench/native``; where that is not writable, ``attnbench-native-UID`` in the
temporary directory), one file per source, constants, flags, compiler and CPU; a build
writes a temporary file and renames it, so processes that build the same library at once do not
see a partial one. The OpenMP runtime is the process's own (``libgomp.so.1``, which torch has
already loaded on Linux), so the kernels' threads are torch's threads, not a second pool.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Mapping

__all__ = ["NativeBuildError", "FLAGS", "cache_dir", "load_library"]

#: -march=native: the library is built on, and cached for, the CPU it runs on. -O3 with
#: reassociation lets the row reductions vectorise (without it GCC sums them in order). On x86,
#: 512-bit vectors where the CPU has them (GCC and Clang default to 256).
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared",
         *(("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()))

_loaded: dict[tuple[str, ...], ctypes.CDLL] = {}
_lock = threading.Lock()


class NativeBuildError(RuntimeError):
    """A kernel could not be compiled or loaded; the message is one line."""


def cache_dir() -> Path:
    """Where built libraries are kept (module docstring)."""
    if os.environ.get("ATTNBENCH_CACHE_DIR"):
        return Path(os.environ["ATTNBENCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "attnbench" / "native"


def _writable_cache_dir() -> Path:
    """:func:`cache_dir`, or a per-user folder in the temporary directory where that cannot be
    created (a read-only home on a cluster node); an explicit ``ATTNBENCH_CACHE_DIR`` is used as is."""
    preferred = cache_dir()
    if os.environ.get("ATTNBENCH_CACHE_DIR"):
        return preferred
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"attnbench-native-{user}"


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def _cpu_signature() -> str:
    """The CPU the library is built for (-march=native): model and feature flags where Linux says."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))   # the first core's lines; the others repeat them


def _compiler_version(compiler: str) -> str:
    try:
        run = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise NativeBuildError(f"no C compiler: {compiler!r} could not run ({type(err).__name__}; set CC)") from None
    return run.stdout.splitlines()[0] if run.stdout else ""


def load_library(source: Path, defines: Mapping[str, int]) -> ctypes.CDLL:
    """The C file ``source`` built with ``-D name=value`` for each of ``defines``, loaded.

    Raises:
        NativeBuildError: no compiler, the build failed (the compiler's first error line), or
            the library does not load.
    """
    compiler = _compiler()
    flags = [*FLAGS, *(f"-D{name}={int(value)}" for name, value in sorted(defines.items()))]
    asked = (str(source), compiler, *flags)
    with _lock:
        if asked in _loaded:   # what this process has loaded: no file or compiler look-up per call
            return _loaded[asked]
        key = hashlib.sha256("\0".join([source.read_text(), *flags, _compiler_version(compiler),
                                         _cpu_signature()]).encode())
        suffix = "-".join(f"{name}{int(value)}" for name, value in sorted(defines.items()))
        target = _writable_cache_dir() / f"{source.stem}-{suffix}-{key.hexdigest()[:16]}.so"
        if not target.exists():
            _build(compiler, source, flags, target)
        try:
            library = ctypes.CDLL(str(target))
        except OSError as err:
            raise NativeBuildError(f"{target} does not load: {str(err).splitlines()[0]}") from None
        _loaded[asked] = library
        return library


def _build(compiler: str, source: Path, flags: list[str], target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(suffix=".so", prefix=f".{target.stem}-", dir=target.parent)
        os.close(handle)
    except OSError as err:
        raise NativeBuildError(f"cannot write the kernel cache {target.parent}: {err.strerror}") from None
    try:
        run = subprocess.run([compiler, *flags, "-o", partial, str(source), "-lm"], capture_output=True, text=True,
                             timeout=300)
        if run.returncode != 0:
            errors = [line for line in run.stderr.splitlines() if "error" in line] or run.stderr.splitlines() or [""]
            raise NativeBuildError(f"{compiler} could not build {source.name}: {errors[0].strip()}")
        os.replace(partial, target)
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"{compiler} took over 300 s to build {source.name}") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
