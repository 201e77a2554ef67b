"""A model out of attnbench: its inference form exported to ``torch.export`` (``.pt2``) and ONNX,
each checked against eager PyTorch and timed beside it in the same process.

The reason to castle is to deploy the cheaper network; this is where it leaves. The model is
castled first (the inference form), exported, and the exported program's output on the same
input is compared with eager PyTorch's: beyond the tolerance the file is removed and the export
refused. The ONNX file is run by onnxruntime (the ``onnx`` extra: onnx, onnxscript, onnxruntime)
on the CPU. Latencies of eager PyTorch, the exported program and onnxruntime are timed
interleaved in this one process (:func:`attnbench.measure.time_interleaved`), with the same
thread count.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from attnbench import kernels, measure, models

__all__ = ["FORMATS", "ExportRefused", "Exported", "export_model", "onnx_available"]

FORMATS = ("pt2", "onnx")
#: kernels during export: the eager fast paths (torch.compile, the default, does not export)
_EXPORT_KERNELS = "fast"


class ExportRefused(ValueError):
    """A model that does not export, or whose exported form disagrees with eager PyTorch."""


@dataclasses.dataclass(frozen=True)
class Exported:
    """One exported file: where, how far from eager PyTorch, and its latency beside eager's."""

    format: str
    path: Path
    max_abs_diff: float     # largest |exported - eager| over the output
    tolerance: float        # allowed: tolerance x max(1, largest |eager|)
    latency_ms: float       # median per forward, this runtime
    eager_ms: float         # median per forward, eager PyTorch, timed in the same rounds

    @property
    def runtime(self) -> str:
        return {"pt2": "torch.export program", "onnx": "onnxruntime"}[self.format]


def onnx_available() -> Optional[str]:
    """None when the ONNX export can run here, else what is missing (the ``onnx`` extra)."""
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except Exception as err:  # noqa: BLE001 - absent, or present but broken (a binary built for other libraries)
            missing.append(module if isinstance(err, ImportError) else f"{module} (fails to import: {_first_line(err)})")
    return None if not missing else (f"the ONNX export needs {', '.join(missing)}: pip install "
                                     f"'attnbench[onnx]'")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _onnx_session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3   # errors only: its warnings are about graph optimisations
    session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _export_one(fmt: str, model: nn.Module, example: torch.Tensor, path: Path, threads: int):
    """Export to ``path``; the callable that runs the exported form."""
    if fmt == "pt2":
        program = torch.export.export(model, (example,))
        torch.export.save(program, str(path))
        module = torch.export.load(str(path)).module()
        return lambda x: module(x)   # a plain callable: an exported module refuses .eval()
    import warnings

    with warnings.catch_warnings():   # the exporter's notes on its own internals, not the user's model
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, verbose=False)
    return _onnx_session(path, threads)


def export_model(model: nn.Module, example: torch.Tensor, stem: Path, formats: Sequence[str] = FORMATS,
                 tolerance: float = 1e-4, threads: Optional[int] = None, repeats: int = 20,
                 name: str = "the model") -> list[Exported]:
    """Castle ``model``, export it to ``stem.pt2`` / ``stem.onnx``, check and time each.

    Args:
        model: a model of :func:`attnbench.models.create_model` (castled here, in place).
        example: an input batch on the CPU (its shape is the exported shape).
        tolerance: refuse an export whose largest difference from eager PyTorch exceeds
            ``tolerance x max(1, largest |eager output|)``.
        name: names the model in a refusal (``variant 'castling'``).

    Raises:
        ExportRefused: the export failed, or disagrees with eager PyTorch (its file is removed).
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportRefused(f"unknown format '{unknown[0]}' (expected {', '.join(FORMATS)})")
    if "onnx" in formats and onnx_available():
        raise ExportRefused(onnx_available())
    threads = int(threads or measure.default_threads())
    model = models.castle(model).eval()
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    runs, written = {}, []
    with kernels.use(_EXPORT_KERNELS), measure.torch_threads(threads):
        with torch.no_grad():
            eager = model(example)
        scale = max(1.0, float(eager.abs().max()))
        for fmt in formats:
            path = stem.with_name(f"{stem.name}.{fmt}")
            try:
                # traced with autograd on, as a user will call it: no in-place inference-only ops in the graph
                run = _export_one(fmt, model, example, path, threads)
                with torch.no_grad():
                    diff = float((run(example) - eager).abs().max())
            except Exception as err:  # noqa: BLE001 - any exporter failure is one line
                path.unlink(missing_ok=True)
                raise ExportRefused(f"{name} does not export to {fmt}: {_first_line(err)}") from None
            if not math.isfinite(diff) or diff > tolerance * scale:
                path.unlink(missing_ok=True)
                raise ExportRefused(f"{name}'s {fmt} export differs from eager PyTorch by {diff:.3g} (allowed "
                                    f"{tolerance * scale:.3g}); the file was removed")
            runs[fmt] = (run, diff, path)
            written.append(path)
        timed = measure.time_interleaved({"eager": (model, example), **{f: (r, example) for f, (r, _, _) in
                                                                        runs.items()}},
                                         threads=threads, repeats=repeats)
    return [Exported(fmt, path, diff, tolerance * scale, timed[fmt].median_ms, timed["eager"].median_ms)
            for fmt, (_, diff, path) in runs.items()]
