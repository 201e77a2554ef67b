"""The interface every attention variant implements: timm's attention contract plus a few hooks.

A variant is an ``nn.Module`` built as ``Variant(dim, num_heads=8, qkv_bias=False, ...,
**options)`` with a fused ``qkv`` projection (C -> 3C) and an output ``proj`` (C -> C), so it
drops into ``timm.create_model(..., attn_layer=Variant)`` and weights move between variants.
Subclasses implement :meth:`AttentionVariant.attend` (per-head core) and
:meth:`AttentionVariant.core_macs`; everything else is shared.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import typing
import weakref
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from attnbench.fields import FieldKind, kind_of_hint
from attnbench.suggest import did_you_mean

__all__ = [
    "AttentionVariant",
    "NoOptions",
    "OptionSpec",
    "LIMIT_KEYS",
    "option_specs",
    "parse_options",
    "preset",
    "token_grid",
    "variant_name",
]

# The name the registry loaded each class under, kept here rather than written onto the class
# (a plugin's class is its author's; two names may load the same class).
_registered_names: "weakref.WeakKeyDictionary[type, str]" = weakref.WeakKeyDictionary()


def remember_variant_name(cls: type, name: str) -> None:
    """Record that the registry loaded ``cls`` as ``name`` (called by the registry only)."""
    _registered_names[cls] = name


def token_grid(num_tokens: int, num_prefix_tokens: int = -1) -> tuple[int, int]:
    """``(prefix, side)``: a ViT sequence of ``num_tokens`` is ``prefix`` tokens (class, registers)
    then a ``side`` x ``side`` grid of patches. ``num_prefix_tokens=-1`` infers the prefix as
    ``N - isqrt(N)**2``.

    Raises:
        ValueError: the tokens after the prefix do not form a square grid.
    """
    prefix = num_tokens - math.isqrt(num_tokens) ** 2 if num_prefix_tokens < 0 else num_prefix_tokens
    side = math.isqrt(max(num_tokens - prefix, 0))
    if prefix > num_tokens or side * side != num_tokens - prefix:
        raise ValueError(f"{num_tokens} tokens with {prefix} prefix tokens leave no square token grid")
    return prefix, side


def variant_name(cls: type) -> str:
    """The name the registry loaded ``cls`` (or the nearest class it derives from) under; its
    class name when it was never loaded through the registry."""
    for klass in cls.__mro__:
        if klass in _registered_names:
            return _registered_names[klass]
    return cls.__name__


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a variant that has none of its own."""


#: Numeric limits an option may declare in its field metadata, e.g. ``metadata={"help": ..., "gt": 0}``;
#: :func:`parse_options` enforces them and ``attnbench variants NAME`` shows them.
LIMIT_KEYS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One typed option of a variant: what a sweep may vary and a user may set.

    Attributes:
        name: keyword name.
        kind: one of ``bool``, ``int``, ``float``, ``str``, ``choice``.
        default: default value (after presets are applied).
        choices: allowed values for ``choice`` options, else ``()``.
        help: one line, from the field's ``metadata['help']``.
        limits: numeric bounds from the field's metadata (``gt``, ``ge``, ``lt``, ``le``), as
            ``(key, bound)`` pairs, lower bound first.
    """

    name: str
    kind: str
    default: Any
    choices: tuple = ()
    help: str = ""
    limits: tuple = ()

    def describe(self) -> str:
        """``name=default`` with the allowed values, on one line."""
        if self.kind == "choice":
            return f"{self.name}={self.default!r} ({self.allowed()})"
        return f"{self.name}={self.default!r} ({', '.join(filter(None, (self.kind, self.allowed())))})"

    def allowed(self) -> str:
        """The values it accepts beyond its type: ``all | head``, ``> 0``, ``in [0, 1)``; ``""`` for any."""
        if self.kind == "choice":
            return " | ".join(map(str, self.choices))
        bounds = dict(self.limits)
        low = next(((k, bounds[k]) for k in ("gt", "ge") if k in bounds), None)
        high = next(((k, bounds[k]) for k in ("lt", "le") if k in bounds), None)
        if low and high:
            return f"in {'(' if low[0] == 'gt' else '['}{low[1]:g}, {high[1]:g}{')' if high[0] == 'lt' else ']'}"
        return " ".join(f"{LIMIT_KEYS[k]} {v:g}" for k, v in filter(None, (low, high)))

    def within_limits(self, value: Any) -> bool:
        compare = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}
        return all(compare[key](value, bound) for key, bound in self.limits)


def _option_kind(variant: type, name: str, hint) -> FieldKind:
    kind = kind_of_hint(hint)
    if kind.kind == "any" or kind.optional:
        raise TypeError(f"variant '{variant.__name__}': option '{name}' has type {hint!r}, which is not supported "
                        f"(bool, int, float, str or Literal)")
    return kind


def option_specs(cls: type["AttentionVariant"]) -> list[OptionSpec]:
    """The typed options of a variant class, with its (possibly preset) defaults."""
    hints = typing.get_type_hints(cls.Options)
    specs = []
    for field in dataclasses.fields(cls.Options):
        kind = _option_kind(cls, field.name, hints[field.name])
        default = cls._bound_options.get(field.name, field.default)
        limits = _field_limits(field, kind.kind)
        specs.append(OptionSpec(field.name, kind.kind, default, kind.choices, field.metadata.get("help", ""), limits))
    return specs


def _field_limits(field: dataclasses.Field, kind: str) -> tuple:
    limits = tuple((key, field.metadata[key]) for key in LIMIT_KEYS if key in field.metadata)
    if not limits:
        return ()
    if kind not in ("int", "float"):
        raise TypeError(f"option '{field.name}': limits ({', '.join(k for k, _ in limits)}) need an int or "
                        f"float option, not {kind}")
    for key, bound in limits:
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            raise TypeError(f"option '{field.name}': limit {key}={bound!r} is not a number")
    if {"gt", "ge"} <= field.metadata.keys() or {"lt", "le"} <= field.metadata.keys():
        raise TypeError(f"option '{field.name}': give one lower limit (gt or ge) and one upper (lt or le)")
    return limits


def _check_value(variant: str, spec: OptionSpec, value: Any) -> Any:
    kind = FieldKind(spec.kind, choices=spec.choices)
    ok = kind.accepts(value) and (not spec.limits or spec.within_limits(value))
    if not ok:
        expected = kind.expected() + (f" {spec.allowed()}" if spec.limits else "")
        hint = did_you_mean(value, spec.choices) if spec.kind == "choice" else ""
        raise ValueError(
            f"variant '{variant}': option '{spec.name}' got {value!r}, expected {expected}{hint}"
        )
    return float(value) if spec.kind == "float" else value


def parse_options(cls: type["AttentionVariant"], options: dict[str, Any]):
    """Validate keyword options against ``cls.Options`` and return an ``Options`` instance.

    Raises:
        ValueError: naming the variant, the option and what is accepted.
    """
    variant = variant_name(cls)
    specs = {spec.name: spec for spec in option_specs(cls)}
    merged = {**cls._bound_options, **options}
    for name in merged:
        if name not in specs:
            accepted = ", ".join(specs) or "no options"
            raise ValueError(
                f"variant '{variant}': unknown option '{name}'{did_you_mean(name, specs)} "
                f"(accepted: {accepted})"
            )
    values = {name: _check_value(variant, specs[name], value) for name, value in merged.items()}
    try:
        return cls.Options(**values)
    except ValueError as err:  # range checks in Options.__post_init__
        raise ValueError(f"variant '{variant}': {err}") from None


def preset(base: type["AttentionVariant"], description: str, **options) -> type["AttentionVariant"]:
    """A subclass of ``base`` whose option defaults are ``options``.

    Used for registered presets (the ablated Castling variants) and to hand a configured
    variant to ``timm.create_model(attn_layer=...)``, which wants a class.
    """
    bound = {**base._bound_options, **options}
    cls = type(base.__name__, (base,), {"_bound_options": bound, "__doc__": description or base.__doc__,
                                         "__module__": base.__module__})
    parse_options(cls, {})  # fail now, not at the first layer built
    return cls


class AttentionVariant(nn.Module):
    """Base class of all attention variants (timm's attention contract).

    Subclasses set ``Options`` (a frozen dataclass of typed defaults) and implement
    :meth:`attend` and :meth:`core_macs`. Train-only branches override
    :meth:`set_progress`, :meth:`regularization` and :meth:`castle`.

    Args:
        dim: token width C.
        num_heads: heads h; C must be divisible by h.
        qkv_bias: bias in the fused ``qkv`` projection.
        qk_norm: normalise q and k per head with ``norm_layer`` (as timm).
        scale_norm: normalise the merged heads before ``proj`` (as timm).
        proj_bias: bias in ``proj``.
        attn_drop: dropout on attention weights, where the variant has them.
        proj_drop: dropout after ``proj``.
        norm_layer: norm class for ``qk_norm``/``scale_norm``.
        **options: the variant's typed options (see ``Options``).
    """

    Options: ClassVar[type] = NoOptions
    #: Option defaults fixed by :func:`preset`.
    _bound_options: ClassVar[dict[str, Any]] = {}
    #: Whether ``forward`` honours ``attn_mask``; others refuse a mask rather than ignore it.
    supports_attn_mask: ClassVar[bool] = False
    #: Kernel implementations the variant offers (a subset of ``attnbench.kernels.IMPLEMENTATIONS``,
    #: its default first), dispatching on ``attnbench.kernels.requested()``; ``()``: only one.
    kernel_implementations: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[type[nn.Module]] = None,
        depth: int = 0,  # timm passes it to some layers; unused here
        device=None,
        dtype=None,
        **options,
    ) -> None:
        super().__init__()
        self.options = parse_options(type(self), options)
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"variant '{self._label()}': {name} must be a positive integer, got {value!r}")
        if dim % num_heads:
            raise ValueError(f"variant '{self._label()}': dim {dim} is not divisible by num_heads {num_heads}")
        if (qk_norm or scale_norm) and norm_layer is None:
            norm_layer = nn.LayerNorm
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def kernel_ran(cls, requested: str) -> str:
        """The implementation this variant runs when ``requested`` is asked for (in this process).

        ``"n/a"`` (``attnbench.kernels.SINGLE``) without alternatives; an implementation it does
        not offer runs its default. Override to report a fallback (e.g. compiling failed).
        """
        from attnbench import kernels

        if not cls.kernel_implementations:
            return kernels.SINGLE
        return requested if requested in cls.kernel_implementations else cls.kernel_implementations[0]

    @classmethod
    def description(cls) -> str:
        """First line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def _label(self) -> str:
        return variant_name(type(self))

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
        return f"dim={self.dim}, num_heads={self.num_heads}" + (f", {opts}" if opts else "")

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """(B, N, C) -> (B, N, C). ``is_causal`` becomes a boolean lower-triangular mask."""
        B, N, C = x.shape
        if is_causal:
            causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            if attn_mask is None or attn_mask.dtype == torch.bool:
                attn_mask = causal if attn_mask is None else causal & attn_mask
            else:  # additive float mask
                attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        if attn_mask is not None and not self.supports_attn_mask:
            raise ValueError(f"variant '{self._label()}' does not support attn_mask or is_causal")
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        y = self.attend(q, k, v, attn_mask)
        if getattr(y, "shape", None) != q.shape:   # one line in the plugin's terms, not a reshape error below
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"variant '{self._label()}': attend() returned {got}, expected (B, h, N, d) = "
                             f"{tuple(q.shape)}")
        y = y.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(self.norm(y)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The per-head core: q, k, v of shape (B, h, N, d) -> (B, h, N, d)."""
        raise NotImplementedError

    def core_macs(self, num_tokens: int) -> int:
        """Analytic MACs of :meth:`attend` for one sequence of ``num_tokens`` (inference form)."""
        raise NotImplementedError

    def core_matmuls(self, batch: int, num_tokens: int) -> Optional[list[tuple[tuple[int, ...], tuple[int, ...]]]]:
        """The batched matmuls :meth:`attend` cannot do without (inference form), as ``(shape of a,
        shape of b)`` pairs for ``torch.matmul``, for ``batch`` sequences of ``num_tokens``.

        ``attnbench bench`` times these alone, with the layer's ``qkv`` and ``proj`` projections,
        as the layer's floor: what no implementation of this attention can beat, so the ratio of
        the layer's latency to it says how much is spent elsewhere (norms, convolutions,
        elementwise passes). None (the default): not declared, and the bench shows no floor.
        :meth:`matmul_shapes` gives the two usual forms.
        """
        return None

    def matmul_shapes(self, batch: int, num_tokens: int, form: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """The core matmuls of the two usual forms, for :meth:`core_matmuls`: ``"quadratic"``
        (Q K^T, then the N x N weights times V) or ``"linear"`` (phi(K)^T V, then phi(Q) times the
        d x d context), per head, on (B, h, N, d) inputs."""
        b, h, n, d = batch, self.num_heads, num_tokens, self.head_dim
        if form == "quadratic":
            return [((b, h, n, d), (b, h, d, n)), ((b, h, n, n), (b, h, n, d))]
        if form == "linear":
            return [((b, h, d, n), (b, h, n, d)), ((b, h, n, d), (b, h, d, d))]
        raise ValueError(f"form must be 'quadratic' or 'linear', got {form!r}")

    def macs(self, num_tokens: int) -> int:
        """Analytic MACs of one forward of this layer (batch 1, inference form).

        Counts multiply-adds of matmuls and convolutions, as counters do; elementwise work
        (softmax, normalisations, biases) is not counted.
        """
        projections = num_tokens * self.dim * 3 * self.dim + num_tokens * self.dim * self.dim
        return projections + self.core_macs(num_tokens)

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1], for schedules. Default: nothing."""

    def regularization(self) -> torch.Tensor:
        """Auxiliary loss from the last forward, added to the training loss. Default: 0."""
        return self.proj.weight.new_zeros(())

    def diagnostics(self) -> dict[str, float]:
        """Scalars to log over training (e.g. mask density). Default: none."""
        return {}

    def castle(self) -> "AttentionVariant":
        """Switch in place to the inference form; return self. Default: nothing to drop."""
        return self
