"""All measuring lives here: MACs, parameters, latency, memory and the environment.

Units are part of every name: MACs are multiply-accumulates (1 MAC = 2 FLOPs), times are
milliseconds (``*_ms``), memory is bytes (``*_bytes``).

- MACs: CPU SDPA is one fused op that counters see as zero, so every count runs under the SDPA
  math backend, which decomposes it into matmuls (see docs/measuring.md).
- Latency: an explicit thread count (``torch.utils.benchmark.Timer`` defaults to one thread),
  set for the call and restored after, timed with ``time.perf_counter`` through ``timeit``
  (on CUDA: CUDA events around each block, after a synchronisation);
  every callable warmed up before any is timed; under ``torch.inference_mode()``. Compare variants with :func:`time_interleaved` (round-robin
  blocks in one process) and repeat the whole in fresh processes: between processes CPU
  timings move far more than within one.
- Memory: on CUDA the allocator's peak; on CPU the peak resident set of a child process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import multiprocessing
import os
import platform
import resource
import statistics
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "count_macs",
    "count_macs_reference",
    "count_params",
    "Latency",
    "time_latency",
    "time_interleaved",
    "Memory",
    "peak_memory",
    "peak_memory_many",
    "default_threads",
]


# --------------------------------------------------------------------------------------- MACs

@contextlib.contextmanager
def _countable():
    # Count with autograd enabled (inference_mode can take fused fast paths), in eval mode.
    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        yield


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of one forward of ``model`` on a zero-batch-dim input of ``input_shape``.

    ptflops' ``aten`` backend (its default ``pytorch`` backend misses ``@``, einsum and timm's
    qkv/proj), under the SDPA math backend. Batch size 1 is prepended. Bias adds are counted.
    """
    from ptflops import get_model_complexity_info  # lazy: only measuring needs it

    was_training = model.training
    model.eval()
    try:
        with _countable():
            macs, _ = get_model_complexity_info(
                model, tuple(input_shape), as_strings=False, backend="aten",
                print_per_layer_stat=False, verbose=False)
    finally:
        model.train(was_training)
    if macs is None:
        raise RuntimeError(f"ptflops could not count {type(model).__name__} on input {tuple(input_shape)}")
    return int(macs)


def count_macs_reference(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs from torch's FlopCounterMode (FLOPs / 2; biases not counted), the cross-check."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else None)
    try:
        with _countable(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those requiring grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------------ latency

def default_threads() -> int:
    """CPU cores this process may run on (its affinity mask), the default thread count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Latency:
    """Latency of one callable, from ``repeats`` timed blocks in one process.

    Attributes:
        median_ms: median over blocks of the mean time of one call, milliseconds.
        iqr_ms: interquartile range over blocks, milliseconds.
        samples_per_s: batch size / median time (batch = leading dim of the first input).
        threads: torch intra-op threads used while timing.
        repeats: number of timed blocks.
        calls_per_block: calls averaged in each block.
        times_ms: per-block mean times, milliseconds.
    """

    median_ms: float
    iqr_ms: float
    samples_per_s: float
    threads: int
    repeats: int
    calls_per_block: int = 1
    times_ms: tuple = ()

    @property
    def iqr_pct(self) -> float:
        """IQR as a percentage of the median."""
        return 100.0 * self.iqr_ms / self.median_ms if self.median_ms > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_tuple(inputs: Inputs) -> tuple:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _batch_size(inputs: tuple) -> int:
    first = inputs[0] if inputs else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def _on_cuda(device) -> bool:
    return str(device).startswith("cuda")


def _sync(device: str) -> None:
    if _on_cuda(device):
        torch.cuda.synchronize(torch.device(device))


class _CudaEventBlock:
    """Times ``number`` calls with CUDA events, ``timeit.Timer``'s interface (``timeit(number)`` in s).

    The device is synchronised first, so no earlier work falls inside the interval; the start
    and end events are recorded on the current stream around the calls, and the end event is
    waited for before ``elapsed_time`` (milliseconds between the two records) is read.
    """

    def __init__(self, fn: Callable, inputs: tuple, device: str):
        self.fn, self.inputs, self.device = fn, inputs, torch.device(device)

    def timeit(self, number: int) -> float:
        with torch.cuda.device(self.device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(number):
                self.fn(*self.inputs)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count set to ``threads`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_interleaved(
    callables: Mapping[str, tuple[Callable, Inputs]],
    *,
    threads: Optional[int] = None,
    warmup: int = 3,
    repeats: int = 20,
    device: str = "cpu",
    min_block_ms: float = 20.0,
    on_block: Optional[Callable[[int, int], None]] = None,
) -> dict[str, Latency]:
    """Time several callables fairly: interleaved, round-robin, in this one process.

    Every callable is warmed up (``warmup`` calls each, every shape) before any is timed; the
    last warm-up call is timed to size its blocks: enough calls to last about ``min_block_ms``,
    at least one. Then ``repeats`` rounds each time one block of every callable, in an order
    rotated every round so that none always follows the same neighbour.

    Threads are set with ``torch.set_num_threads`` for the whole call (restored after) and CPU
    blocks are timed with ``time.perf_counter`` through ``timeit``:
    ``torch.utils.benchmark.Timer.timeit`` would add two untimed calls to every block, tripling
    the cost of slow callables. All under
    ``torch.inference_mode()``; modules are put in eval mode.

    Args:
        callables: name -> (module or function, inputs); inputs is a tensor or a tuple of them,
            already on ``device``.
        threads: torch intra-op threads (default: :func:`default_threads`). Set, and recorded.
        warmup: untimed calls of each callable before any timing (at least 1 is made).
        repeats: timed blocks per callable.
        device: ``"cpu"`` or ``"cuda"``; on CUDA every block is timed with CUDA events after a
            synchronisation (:class:`_CudaEventBlock`).
        min_block_ms: target duration of one block, milliseconds.
        on_block: called as ``on_block(done, total)`` after each timed block.

    Returns:
        name -> :class:`Latency`.
    """
    import time
    import timeit

    threads = int(threads or default_threads())
    if threads < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"need threads >= 1, warmup >= 0, repeats >= 1 (got {threads}, {warmup}, {repeats})")
    names = list(callables)
    entries = {}
    for name in names:
        fn, inputs = callables[name]
        if isinstance(fn, nn.Module):
            fn.eval()
        entries[name] = (fn, _as_tuple(inputs))

    with torch_threads(threads), torch.inference_mode():
        blocks, numbers = {}, {}
        for name in names:  # warm up every callable and shape before timing any
            fn, inputs = entries[name]
            for _ in range(max(warmup, 1) - 1):
                fn(*inputs)
            if _on_cuda(device):
                blocks[name] = _CudaEventBlock(fn, inputs, device)
            else:
                blocks[name] = timeit.Timer(stmt="fn(*inputs)", timer=time.perf_counter, globals={"fn": fn, "inputs": inputs})
            one_call_s = blocks[name].timeit(1)
            numbers[name] = max(1, math.ceil(min_block_ms / 1e3 / max(one_call_s, 1e-9)))
        times: dict[str, list[float]] = {name: [] for name in names}
        done, total = 0, repeats * len(names)
        for round_ in range(repeats):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                number = numbers[name]
                times[name].append(blocks[name].timeit(number) / number * 1e3)
                done += 1
                if on_block is not None:
                    on_block(done, total)

    result = {}
    for name in names:
        q1, median, q3 = _quartiles(times[name])
        batch = _batch_size(entries[name][1])
        result[name] = Latency(median_ms=median, iqr_ms=q3 - q1, samples_per_s=batch / (median / 1e3),
                               threads=threads, repeats=repeats, calls_per_block=numbers[name],
                               times_ms=tuple(times[name]))
    return result


def time_latency(fn_or_module: Callable, inputs: Inputs, *, threads: Optional[int] = None,
                 warmup: int = 3, repeats: int = 20, device: str = "cpu",
                 min_block_ms: float = 20.0) -> Latency:
    """Latency of one callable on ``inputs``; see :func:`time_interleaved` for the protocol.

    To compare variants, time them together with :func:`time_interleaved` instead, and repeat
    in fresh processes: absolute CPU times move between processes.
    """
    return time_interleaved({"fn": (fn_or_module, inputs)}, threads=threads, warmup=warmup,
                            repeats=repeats, device=device, min_block_ms=min_block_ms)["fn"]


# ------------------------------------------------------------------------------------- memory

@dataclasses.dataclass(frozen=True)
class Memory:
    """Peak memory of one forward.

    Attributes:
        peak_bytes: the peak during the forward (CUDA: allocator peak; CPU: peak resident set of
            the measuring process, interpreter and libraries included).
        baseline_bytes: the same quantity just before the forward (weights and input included).
        forward_bytes: ``peak_bytes - baseline_bytes``, what the forward itself added at peak.
        method: how it was measured.
    """

    peak_bytes: int
    baseline_bytes: int
    forward_bytes: int
    method: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _proc_status_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: "5" resets VmHWM to the current VmRSS
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _measure_one(build: Callable[[], nn.Module], input_shape: Sequence[int], device: str) -> Memory:
    model = build().to(device).eval()
    x = torch.randn(*input_shape, device=device)
    with torch.inference_mode():
        model(x)  # first call: one-time caches (oneDNN primitives, allocator pools) are not counted
        _sync(device)
        gc.collect()
        if _on_cuda(device):
            cuda = torch.device(device)
            torch.cuda.reset_peak_memory_stats(cuda)   # the peak now restarts from what is allocated
            base = torch.cuda.memory_allocated(cuda)
            model(x)
            torch.cuda.synchronize(cuda)
            peak = torch.cuda.max_memory_allocated(cuda)
            method = "cuda max_memory_allocated"
        elif _reset_peak_rss() and _proc_status_bytes("VmRSS") is not None:
            base = _proc_status_bytes("VmRSS")
            model(x)
            peak = _proc_status_bytes("VmHWM")
            method = "cpu child VmHWM-VmRSS"
        else:  # ru_maxrss never goes down: a lower bound when an earlier peak was higher
            scale = 1 if platform.system() == "Darwin" else 1024
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            model(x)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            method = "cpu child ru_maxrss (lower bound)"
    del model, x
    gc.collect()
    return Memory(int(peak), int(base), max(0, int(peak) - int(base)), method)


def _memory_child(jobs, threads, conn) -> None:  # runs in a spawned process
    # glibc's default malloc here, whatever the parent's (attnbench.allocator): memory kept from
    # the untimed first forward would hide the measured forward's peak from ru_maxrss
    try:
        torch.set_num_threads(threads)
        conn.send(("ok", [_measure_one(build, shape, "cpu") for build, shape in jobs]))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def peak_memory_many(jobs: Sequence[tuple[Callable[[], nn.Module], Sequence[int]]], *,
                     device: str = "cpu", threads: Optional[int] = None) -> list[Memory]:
    """Peak memory of one inference forward for each ``(build, input_shape)`` job.

    ``build`` returns the module (for CPU it must be picklable, e.g. a module-level function
    or a ``functools.partial`` of one); ``input_shape`` includes the batch. Each job runs one
    untimed forward first, so one-time caches are not counted.

    CUDA: measured here, as ``torch.cuda.max_memory_allocated()`` after
    ``reset_peak_memory_stats()``: tensors only, not the caching allocator's reserve nor
    the CUDA context.

    CPU: measured in ONE fresh child process (``multiprocessing`` spawn), jobs in turn. Before
    each forward the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``); the result is
    the peak resident set (``VmHWM``) reached during the forward and its rise above the
    resident set just before (``VmRSS``). What this sees: pages actually touched, at page
    granularity, by everything in the process (tensors, oneDNN scratch, allocator slack). What it
    misses: memory the allocator reuses from pages freed earlier and still resident. To keep
    that small the child runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc returns large
    blocks to the system when freed. Without ``clear_refs`` it falls back to ``ru_maxrss``
    deltas, a lower bound, and says so in ``method``.

    Args:
        jobs: ``(build, input_shape)`` pairs.
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch threads in the child (CPU), default :func:`default_threads`.
    """
    if _on_cuda(device):
        return [_measure_one(build, shape, str(device)) for build, shape in jobs]
    threads = int(threads or default_threads())
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        child = ctx.Process(target=_memory_child, args=(list(jobs), threads, send), daemon=True)
        child.start()
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"memory measurement child died (exit code {child.exitcode})") from None
    finally:
        receive.close()
    child.join()
    if status != "ok":
        raise RuntimeError(f"memory measurement failed in the child: {payload}")
    return payload


def peak_memory(build: Callable[[], nn.Module], input_shape: Sequence[int], *, device: str = "cpu",
                threads: Optional[int] = None) -> Memory:
    """Peak memory of one inference forward of ``build()``; see :func:`peak_memory_many`."""
    return peak_memory_many([(build, input_shape)], device=device, threads=threads)[0]

