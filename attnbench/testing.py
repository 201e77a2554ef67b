"""Conformance checks every variant must pass, for attnbench's own tests and for plugin authors.

A plugin author subclasses one class in their test suite::

    from attnbench.testing import VariantConformance

    class TestMyAttention(VariantConformance):
        variant = "my-attention"          # the registered name
        options = {"feature_dim": 32}     # optional: options to build it with

and pytest runs every check, plus :func:`check_installed_copy` (the tests exercise the installed
plugin, not a source tree that shadows it). ``attnbench variants --check [NAME --option k=v]`` runs
the checks in ``CHECKS`` without pytest.
Each check is a plain function ``check_x(variant, options)`` that raises ``AssertionError``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.metadata
import inspect
import json
import traceback
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from attnbench.registry import (BUILTIN_DISTRIBUTION, LOCAL_DISTRIBUTION, build_attention, get_variant,
                                variant_class, variant_info)
from attnbench.variant import option_specs

__all__ = ["CHECKS", "CheckResult", "VariantConformance", "run_checks", "check_installed_copy",
           "HALF_PRECISION_TOLERANCE", "half_precision_error", "assert_matches_reference"]

DIM, HEADS, TOKENS, BATCH = 48, 3, 17, 2   # 17 = 16 grid tokens + a class token


def _layer(variant: str, options: dict, **kwargs):
    with torch.random.fork_rng(devices=[]):   # the caller's random state is left as it was
        torch.manual_seed(0)
        return build_attention(variant, DIM, HEADS, **options, **kwargs)


def _input(dtype=torch.float32, requires_grad=False) -> torch.Tensor:
    x = torch.randn(BATCH, TOKENS, DIM, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return x.requires_grad_(requires_grad)


def _shape_checked_attend(layer) -> None:
    """Make ``layer.attend`` fail with a clear message when it returns anything but (B, h, N, d)."""
    inner = layer.attend

    def attend(q, k, v, attn_mask):
        out = inner(q, k, v, attn_mask)
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        assert shape == tuple(q.shape), f"attend() returned {shape}, expected (B, h, N, d) = {tuple(q.shape)}"
        return out

    layer.attend = attend   # an instance attribute: forward's self.attend finds it first


def check_shape_and_dtype(variant: str, options: dict) -> None:
    """(B, N, C) -> (B, N, C), in float32 and float64, finite; attend() keeps (B, h, N, d)."""
    for dtype in (torch.float32, torch.float64):
        layer = _layer(variant, options).to(dtype)
        _shape_checked_attend(layer)
        y = layer(_input(dtype))
        assert y.shape == (BATCH, TOKENS, DIM), f"output shape {tuple(y.shape)}"
        assert y.dtype == dtype, f"output dtype {y.dtype} for input {dtype}"
        assert torch.isfinite(y).all(), "non-finite output"


def check_interface(variant: str, options: dict) -> None:
    """timm's submodule names and the hook methods exist and behave."""
    layer = _layer(variant, options)
    assert isinstance(layer.qkv, torch.nn.Linear) and layer.qkv.out_features == 3 * DIM, "qkv must be Linear C -> 3C"
    assert isinstance(layer.proj, torch.nn.Linear) and layer.proj.in_features == DIM, "proj must be Linear C -> C"
    layer.set_progress(0.5)
    reg = layer.regularization()
    assert isinstance(reg, torch.Tensor) and reg.dim() == 0, "regularization() must return a scalar tensor"
    assert isinstance(layer.diagnostics(), dict), "diagnostics() must return a dict"
    assert isinstance(layer.macs(TOKENS), int) and layer.macs(TOKENS) > 0, "macs(N) must be a positive int"


def check_gradients(variant: str, options: dict) -> None:
    """Gradients reach the input, qkv and proj, and are finite."""
    layer = _layer(variant, options).train()
    x = _input(requires_grad=True)
    (layer(x).square().mean() + layer.regularization()).backward()
    for name in ("qkv", "proj"):
        grad = getattr(layer, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"
        assert torch.isfinite(grad).all(), f"non-finite gradient in {name}"
    assert x.grad is not None and torch.isfinite(x.grad).all(), "input gradient missing or non-finite"


def check_determinism(variant: str, options: dict) -> None:
    """Same weights, same input: bit-identical output (eval mode)."""
    layer = _layer(variant, options).eval()
    x = _input()
    assert torch.equal(layer(x), layer(x)), "two forwards differ"
    twin = _layer(variant, options).eval()
    assert torch.equal(layer(x), twin(x)), "two layers built with the same seed differ"


def check_zero_token(variant: str, options: dict) -> None:
    """A zero token (q = k = v = 0 without biases) gives no NaN, forward or backward."""
    layer = _layer(variant, options).train()
    x = _input().clone()
    x[:, 3] = 0.0
    x.requires_grad_(True)
    y = layer(x)
    assert torch.isfinite(y).all(), "non-finite output with a zero token"
    (y.sum() + layer.regularization()).backward()
    assert torch.isfinite(x.grad).all(), "non-finite input gradient with a zero token"
    for name, param in layer.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), f"non-finite gradient in {name}"


def _wrong_value(spec) -> Any:
    return {"bool": "yes", "int": 1.5, "float": "x", "str": 3, "choice": "__not_a_choice__"}[spec.kind]


def check_options_validation(variant: str, options: dict) -> None:
    """Unknown options and wrong types raise ValueError naming the variant and the option."""
    try:
        _layer(variant, {**options, "definitely_not_an_option": 1})
    except ValueError as err:
        assert "definitely_not_an_option" in str(err) and variant in str(err), f"unclear message: {err}"
    else:
        raise AssertionError("an unknown option was accepted")
    for spec in option_specs(get_variant(variant)):
        try:
            _layer(variant, {**options, spec.name: _wrong_value(spec)})
        except ValueError as err:
            assert spec.name in str(err), f"message does not name option {spec.name!r}: {err}"
        else:
            raise AssertionError(f"option {spec.name!r} accepted a value of the wrong type")


def check_option_docs(variant: str, options: dict) -> None:
    """Every option declares its help (``metadata={"help": ...}``), shown by ``attnbench variants NAME``."""
    missing = [spec.name for spec in option_specs(get_variant(variant)) if not spec.help.strip()]
    assert not missing, f"option(s) without metadata['help']: {', '.join(missing)}"


def check_castle(variant: str, options: dict) -> None:
    """castle() returns self, keeps the state dict, and afterwards training progress changes nothing."""
    layer = _layer(variant, options).eval()
    keys = {k: v.shape for k, v in layer.state_dict().items()}
    assert layer.castle() is layer, "castle() must return self"
    assert {k: v.shape for k, v in layer.state_dict().items()} == keys, "castle() changed the state dict"
    x = _input()
    outputs = []
    for progress in (0.0, 0.5, 1.0):
        layer.set_progress(progress)
        outputs.append(layer(x))
    assert all(torch.equal(outputs[0], o) for o in outputs), "castled output depends on training progress"
    assert torch.equal(layer.castle()(x), outputs[0]), "castle() is not idempotent"
    assert layer.regularization().item() == 0.0, "a castled layer must add no regularisation"


def check_macs(variant: str, options: dict) -> None:
    """macs(N) agrees with torch's FlopCounterMode (SDPA math backend) within 1%, castled."""
    from attnbench.measure import count_macs_reference

    for tokens in (TOKENS, 65):
        layer = copy.deepcopy(_layer(variant, options)).castle()
        counted = count_macs_reference(layer, (tokens, DIM))
        analytic = layer.macs(tokens)
        projections = analytic - layer.core_macs(tokens)
        assert abs(counted - analytic) <= 0.01 * analytic, \
            (f"core_macs({tokens}) = {layer.core_macs(tokens):,}, but the counter sees {counted - projections:,} "
             f"in attend() (the layer's {counted:,} counted less {projections:,} of qkv and proj); "
             "core_macs counts all heads, batch 1, the multiply-adds of matmuls and convolutions, no biases")


def check_timm_drop_in(variant: str, options: dict) -> None:
    """The variant works as timm's ``attn_layer`` in a VisionTransformer, forward and backward."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=DIM, depth=2,
                                  num_heads=HEADS, attn_layer=variant_class(variant, **options))
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    logits = model(images)
    assert logits.shape == (2, 5), f"logits shape {tuple(logits.shape)}"
    logits.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None, "no gradient through the timm model"


# --- half precision -------------------------------------------------------------------------------

#: Largest allowed normwise error (:func:`half_precision_error`) of an output or a gradient in
#: half precision against float32: 8 machine epsilons of the dtype (bfloat16 2^-7, float16
#: 2^-10). A layer rounds its input, weights and products once or twice each, so errors are a
#: few epsilons; measured on the built-ins (these checks and tests/test_variants.py): outputs at
#: most 1.2 eps, gradients at most 4.1 eps (Castling's mask flipping where rounding moves a
#: probability across the threshold); 8 leaves twice that.
HALF_PRECISION_TOLERANCE = {dtype: 8 * torch.finfo(dtype).eps for dtype in (torch.bfloat16, torch.float16)}
#: Scale of the large-magnitude token: |q|^2 reaches about 1e6, beyond float16 (65504).
LARGE_TOKEN = 300.0


def _forward_backward(layer, x: torch.Tensor, dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, list]:
    """Output (float32) and the gradients of input and parameters (float32) of a float32 loss;
    under CPU autocast to ``dtype`` unless None."""
    x = x.detach().clone().requires_grad_(True)
    context = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with context:
        y = layer(x)
    loss = y.float().square().mean() + y.float().mean() + layer.regularization().float()
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    names = ["input"] + [name for name, p in layer.named_parameters() if p.requires_grad]
    return y.detach(), [(name, g.float()) for name, g in zip(names, grads) if g is not None]


def _inference(layer, x: torch.Tensor, dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, list]:
    """Output of the castled layer in eval mode under ``torch.no_grad`` (what ``bench``, ``export``
    and a deployment run), under CPU autocast to ``dtype`` unless None; no gradients."""
    layer = layer.eval().castle()
    context = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.no_grad(), context:
        return layer(x), []


def half_precision_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """|actual - expected| / |expected|, Frobenius norms in float64 (the absolute error when expected is 0).

    Normwise, not elementwise: a sum that cancels, or a ReLU kink that rounding moves across,
    makes single elements of a gradient arbitrarily wrong in relative terms without the layer
    being any less accurate as a whole."""
    actual, expected = actual.detach(), expected.detach().double()
    diff = torch.linalg.vector_norm(actual.double() - expected)
    scale = torch.linalg.vector_norm(expected)
    return float(diff / scale) if scale > 0 else float(diff)


def _half_pairs(variant: str, options: dict, x: torch.Tensor):
    """For each half dtype and mode: (label, dtype, half output and gradients, float32 ones).

    ``autocast``: float32 weights under ``torch.autocast`` (what training and ``bench --dtype``
    run), against plain float32. ``cast``: the layer and input cast to the dtype, against float32
    with the same rounded weights and input. Each in training (forward and backward) and as
    castled inference (eval, no gradient: a variant may run another path there).
    """
    for dtype in HALF_PRECISION_TOLERANCE:
        for mode, run in (("", _forward_backward), (", castled inference", _inference)):
            layer = _layer(variant, options).train()
            yield (f"{dtype} autocast{mode}", dtype, run(layer, x, dtype), run(layer, x, None))
            half = _layer(variant, options).train().to(dtype)
            rounded = _layer(variant, options).train().to(dtype).float()
            yield (f"{dtype} cast{mode}", dtype, run(half, x.to(dtype), None), run(rounded, x.to(dtype).float(), None))


def check_half_precision_matches_float32(variant: str, options: dict) -> None:
    """bfloat16 and float16 (autocast and cast), forward and backward, and castled inference
    (eval, no gradient), within HALF_PRECISION_TOLERANCE of float32."""
    for label, dtype, (y, grads), (y_ref, grads_ref) in _half_pairs(variant, options, _input()):
        assert y.dtype == dtype, f"{label}: output dtype {y.dtype}"
        tolerance = HALF_PRECISION_TOLERANCE[dtype]
        error = half_precision_error(y, y_ref)
        assert error <= tolerance, f"{label}: output differs from float32 by {error:.2e} (allowed {tolerance:.2e})"
        assert [n for n, _ in grads] == [n for n, _ in grads_ref], f"{label}: gradients reach other parameters"
        for (name, g), (_, g_ref) in zip(grads, grads_ref):
            error = half_precision_error(g, g_ref)
            assert error <= tolerance, \
                f"{label}: gradient of {name} differs from float32 by {error:.2e} (allowed {tolerance:.2e})"


def _hostile_inputs() -> dict[str, torch.Tensor]:
    """The inputs of :func:`check_half_precision_finite`, by the name its failures give."""
    large, zero_token, zero_sample = _input(), _input(), _input()
    large[0, 5] *= LARGE_TOKEN
    zero_token[0, 3] = 0.0
    zero_sample[1] = 0.0
    return {f"token 5 of sample 0 scaled x{LARGE_TOKEN:g}": large, "token 3 of sample 0 all zero": zero_token,
            "sample 1 all zero": zero_sample}


def check_half_precision_finite(variant: str, options: dict) -> None:
    """bfloat16 and float16 (autocast and cast) stay finite, forward and backward and in castled
    inference, with a large token (x300), a zero token and an all-zero sample (three inputs; a
    failure names the one)."""
    for what, x in _hostile_inputs().items():
        for dtype in HALF_PRECISION_TOLERANCE:
            runs = {}
            for mode, run in (("", _forward_backward), (", castled inference", _inference)):
                runs[f"{dtype} autocast{mode}"] = lambda run=run: run(_layer(variant, options).train(), x, dtype)
                runs[f"{dtype} cast{mode}"] = lambda run=run: run(_layer(variant, options).train().to(dtype),
                                                                  x.to(dtype), None)
            for label, run in runs.items():
                y, grads = run()
                assert torch.isfinite(y).all(), f"{label}: non-finite output for the input with {what}"
                for name, g in grads:
                    assert torch.isfinite(g).all(), \
                        f"{label}: non-finite gradient of {name} for the input with {what}"


CHECKS: list[Callable[[str, dict], None]] = [
    check_interface,
    check_shape_and_dtype,
    check_gradients,
    check_determinism,
    check_zero_token,
    check_options_validation,
    check_option_docs,
    check_castle,
    check_macs,
    check_timm_drop_in,
    check_half_precision_matches_float32,
    check_half_precision_finite,
]


def check_installed_copy(variant: str, options: dict) -> None:
    """A plugin's class is imported from its installed distribution, not from a source tree
    that shadows it on ``sys.path`` (as the plugin's folder does when pytest runs there).

    An editable install (``pip install -e``) is its source tree, so any file under it passes.
    The built-in variants and in-process registrations are not installed copies and pass.
    """
    info = variant_info(variant)
    if info.distribution in (BUILTIN_DISTRIBUTION, LOCAL_DISTRIBUTION):
        return   # attnbench's own tests run against its working tree on purpose
    imported = Path(inspect.getfile(info.cls)).resolve()
    dist = importlib.metadata.distribution(info.distribution)
    editable = _editable_root(dist)
    if editable is not None:
        assert imported.is_relative_to(editable), (
            f"variant '{variant}' was imported from {imported}, outside the editable install of "
            f"'{info.distribution}' ({editable}): another copy shadows it on sys.path")
        return
    installed = {Path(str(dist.locate_file(f))).resolve() for f in dist.files or ()}
    if not installed:
        return   # no RECORD (e.g. a hand-made dist-info): nothing to compare with
    assert imported in installed, (
        f"variant '{variant}' was imported from {imported}, not from the installed distribution "
        f"'{info.distribution}' ({Path(str(dist.locate_file(''))).resolve()}): a source tree shadows it on "
        f"sys.path, so these tests do not test what users install. Run pytest with --import-mode=importlib "
        f"from a folder that holds no copy of the package (a src/ layout avoids this), or install with -e")


def _editable_root(dist) -> Optional[Path]:
    """The source folder of an editable install (PEP 610 direct_url.json), else None."""
    try:
        url = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return None
    if not url.get("dir_info", {}).get("editable") or not url.get("url", "").startswith("file:"):
        return None
    return Path(urllib.request.url2pathname(urllib.parse.urlparse(url["url"]).path)).resolve()


@dataclasses.dataclass(frozen=True)
class CheckResult:
    check: str
    passed: bool
    message: str = ""


#: Checks that need nothing from a working forward: they still run when the output shape is wrong.
_WITHOUT_FORWARD = ("check_options_validation", "check_option_docs")
_WRONG_SHAPE = "not run: the layer's output shape is wrong (see check_shape_and_dtype)"


def _shape_problem(variant: str, options: dict) -> Optional[str]:
    """The message of a failed :func:`check_shape_and_dtype` when it is about a shape, else None."""
    try:
        check_shape_and_dtype(variant, options)
    except Exception as err:  # noqa: BLE001 - any other failure is the checks' to report
        return str(err) if "attend() returned" in str(err) or "output shape" in str(err) else None
    return None


def run_checks(variant: str, options: Optional[dict] = None) -> list[CheckResult]:
    """Run every conformance check on ``variant``; never raises for a failing check. A wrong
    output shape is reported once, by ``check_shape_and_dtype``; the checks that need a working
    forward are then listed as not run."""
    results = []
    wrong_shape = _shape_problem(variant, dict(options or {}))
    for check in CHECKS:
        if wrong_shape and check.__name__ not in _WITHOUT_FORWARD:
            results.append(CheckResult(check.__name__, False,
                                       wrong_shape if check is check_shape_and_dtype else _WRONG_SHAPE))
            continue
        try:
            check(variant, dict(options or {}))
        except AssertionError as err:
            results.append(CheckResult(check.__name__, False, str(err)))
        except Exception as err:  # noqa: BLE001 - a crash is a failed check, reported in one line
            where = traceback.extract_tb(err.__traceback__)[-1]
            results.append(CheckResult(check.__name__, False,
                                       f"{type(err).__name__}: {err} ({where.filename}:{where.lineno})"))
        else:
            results.append(CheckResult(check.__name__, True))
    return results


class VariantConformance:
    """Subclass in a pytest module and set ``variant`` (and ``options``) to run every check."""

    variant: str = ""
    options: dict = {}

    def _run(self, check) -> None:
        if not self.variant:
            raise AssertionError(f"{type(self).__name__}.variant is not set")
        if check is not check_shape_and_dtype and check.__name__ not in _WITHOUT_FORWARD:
            key = (type(self), self.variant, json.dumps(self.options, sort_keys=True, default=str))
            if key not in _SHAPE_PROBLEMS:
                _SHAPE_PROBLEMS[key] = _shape_problem(self.variant, dict(self.options))
            if _SHAPE_PROBLEMS[key]:
                import pytest

                pytest.skip(_WRONG_SHAPE)
        check(self.variant, dict(self.options))


_SHAPE_PROBLEMS: dict[tuple, Optional[str]] = {}   # per suite class: run the shape check once


def assert_matches_reference(layer: torch.nn.Module, reference: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
                             x: torch.Tensor, *, rtol: Optional[float] = None, atol: Optional[float] = None) -> None:
    """Compare ``layer(x)`` with ``reference(layer, x)``, forward and backward: the outputs, then
    the gradients (of a fixed random weighting of the output) with respect to ``x`` and to every
    parameter of the layer. Tolerances are ``torch.testing.assert_close``'s for the dtype unless
    given; use float64 for a tight comparison. The first difference is named (``output``,
    ``gradient of input``, ``gradient of qkv.weight``, ...)."""
    params = [(name, p) for name, p in layer.named_parameters() if p.requires_grad]
    results = []
    for fn in (lambda: layer(xi), lambda: reference(layer, xi)):
        xi = x.detach().clone().requires_grad_(True)
        y = fn()
        weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype).to(y.device)
        grads = torch.autograd.grad((y * weight).sum(), [xi, *[p for _, p in params]], allow_unused=True)
        results.append((y.detach(), grads))
    (y, grads), (y_ref, grads_ref) = results
    tolerance = {"rtol": rtol, "atol": atol} if rtol is not None or atol is not None else {}
    torch.testing.assert_close(y, y_ref, **tolerance, msg=lambda m: f"output differs from the reference: {m}")
    for name, g, g_ref in zip(["input", *[n for n, _ in params]], grads, grads_ref):
        if g is None or g_ref is None:
            assert g is None and g_ref is None, f"gradient of {name}: reaches only one of layer and reference"
            continue
        torch.testing.assert_close(g, g_ref, **tolerance,
                                   msg=lambda m, name=name: f"gradient of {name} differs from the reference: {m}")


def _as_test(check: Callable[[str, dict], None]):
    def test(self) -> None:
        self._run(check)

    test.__name__ = "test_" + check.__name__.removeprefix("check_")
    test.__doc__ = check.__doc__
    return test


for _check in CHECKS + [check_installed_copy]:  # one test method per check: a new check needs no second edit
    setattr(VariantConformance, _as_test(_check).__name__, _as_test(_check))
