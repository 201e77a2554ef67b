"""timm vision transformers with an attention variant in every attention slot.

:func:`create_model` builds any timm ViT/DeiT-family model with ``attn_layer`` set to a
registered variant; :func:`swap_attention` puts a variant into a model that is already built
(a local checkpoint, say), keeping its ``qkv`` and ``proj`` weights. The small CPU-sized
configurations below are registered with timm, so ``timm.create_model("vit_pico_patch4_32")``
knows them too. Nothing is ever downloaded: ``pretrained=True`` is refused; pass a local
``checkpoint_path`` instead.

The remaining helpers (:func:`castle`, :func:`castle_changes`, :func:`set_progress`,
:func:`regularization`, :func:`diagnostics`) apply the variant hooks to every
:class:`AttentionVariant` of a model.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from typing import Any, Optional, Union

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from attnbench import checkpoints, registry
from attnbench.suggest import did_you_mean
from attnbench.variant import AttentionVariant

__all__ = [
    "SMALL_MODELS",
    "ModelError",
    "SwapReport",
    "create_model",
    "load_checkpoint",
    "load_state",
    "checkpoint_fit_problem",
    "swap_attention",
    "variant_layers",
    "castle",
    "castle_changes",
    "set_progress",
    "regularization",
    "diagnostics",
]


class ModelError(ValueError):
    """An unknown architecture, one without attention slots, or a checkpoint that does not fit."""


# --- small configurations, registered with timm -------------------------------------------------

#: name -> (architecture arguments, one-line description). 32x32 ones suit CIFAR-10 and
#: pathfinder; the 8x8 ones suit scikit-learn's digits at their native resolution.
SMALL_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    "vit_pico_patch2_8": (dict(img_size=8, patch_size=2, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0),
                          "8x8 input, 4x4 grid + class token, width 64, depth 4, 2 heads (digits)"),
    "vit_pico_patch1_8": (dict(img_size=8, patch_size=1, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0),
                          "8x8 input, 8x8 grid + class token, width 64, depth 4, 2 heads (digits, one token a pixel)"),
    "vit_pico_patch4_32": (dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0),
                           "32x32 input, 8x8 grid + class token, width 64, depth 4, 2 heads"),
    "vit_nano_patch4_32": (dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0),
                           "32x32 input, 8x8 grid + class token, width 128, depth 6, 4 heads"),
    "vit_nano_patch2_32": (dict(img_size=32, patch_size=2, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0),
                           "32x32 input, 16x16 grid + class token, width 128, depth 6, 4 heads"),
    "vit_micro_patch4_32": (dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),
                            "32x32 input, 8x8 grid + class token, width 192 (DeiT-Ti), depth 6, 3 heads"),
}


def _cfg(img_size: int, **kwargs) -> dict[str, Any]:
    # No hub id and no url: these models have no pretrained weights, so timm never fetches.
    return {"url": "", "num_classes": 10, "input_size": (3, img_size, img_size), "pool_size": None,
            "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "first_conv": "patch_embed.proj", "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({name: _cfg(args["img_size"]) for name, (args, _) in SMALL_MODELS.items()})


def _small_vit(name: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    args, _ = SMALL_MODELS[name]
    kwargs.setdefault("num_classes", 10)
    return build_model_with_cfg(VisionTransformer, name, pretrained=pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs))


def _entrypoint(name: str):
    def fn(pretrained: bool = False, **kwargs) -> VisionTransformer:
        return _small_vit(name, pretrained=pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = __name__
    fn.__doc__ = f"attnbench small ViT: {SMALL_MODELS[name][1]}."
    return fn


for _name in SMALL_MODELS:
    globals()[_name] = register_model(_entrypoint(_name))
    __all__.append(_name)
del _name


# --- building -----------------------------------------------------------------------------------

def variant_layers(model: nn.Module) -> list[tuple[str, AttentionVariant]]:
    """(qualified name, layer) of every :class:`AttentionVariant` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AttentionVariant)]


@contextlib.contextmanager
def seeded(seed: Optional[int]):
    """Seed torch's CPU generator inside the block (model initialisation) and give the caller's
    random state back after it; ``None``: nothing is seeded."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def create_model(arch: str, variant: Union[str, type[AttentionVariant]] = registry.DEFAULT_VARIANT,
                 variant_options: Optional[dict[str, Any]] = None, *, seed: Optional[int] = None,
                 checkpoint_path: Optional[Union[str, os.PathLike]] = None, **model_kwargs) -> nn.Module:
    """A timm ViT/DeiT-family model with ``variant`` in every attention slot.

    Args:
        arch: a timm model name whose constructor takes ``attn_layer`` (``vit_*``, ``deit_*``,
            or one of :data:`SMALL_MODELS`, e.g. ``vit_pico_patch4_32``).
        variant: a registered variant name (``"castling"``) or a variant class.
        variant_options: the variant's options, validated now.
        seed: if given, torch is seeded with it for the initialisation only (the caller's
            random state is left as it was), so the same seed gives the same weights.
        checkpoint_path: a local state dict (``.pth``/``.pt``/``.safetensors``) loaded with
            :func:`load_checkpoint`; its report is kept as ``model.attnbench_checkpoint``.
        **model_kwargs: passed to ``timm.create_model`` (``num_classes``, ``in_chans``,
            ``img_size``, ``drop_path_rate``, ...). ``pretrained=True`` is refused: attnbench
            never downloads.

    Raises:
        ModelError: unknown architecture, or one without ViT-style attention slots.
        VariantError / ValueError: unknown variant or bad options.
    """
    if model_kwargs.pop("pretrained", False):
        raise ModelError("attnbench never downloads weights: pass checkpoint_path=<local file> instead of "
                         "pretrained=True")
    if "attn_layer" in model_kwargs:
        raise ModelError("pass the attention as 'variant', not 'attn_layer'")
    attn_layer = registry.variant_class(variant, **(variant_options or {}))
    if not timm.is_model(arch):
        raise ModelError(f"unknown model architecture '{arch}'"
                         f"{did_you_mean(arch, timm.list_models('*vit*') + timm.list_models('*deit*'))}")
    with seeded(seed):
        try:
            model = timm.create_model(arch, pretrained=False, attn_layer=attn_layer, **model_kwargs)
        except TypeError as err:
            if "attn_layer" in str(err):
                raise ModelError(f"architecture '{arch}' has no 'attn_layer' slot; use a ViT/DeiT-family "
                                 f"model (e.g. {', '.join(list(SMALL_MODELS)[:2])}, vit_tiny_patch16_224)") from None
            raise
    if not variant_layers(model):
        raise ModelError(f"architecture '{arch}' accepted attn_layer but built no attention variant layer")
    if checkpoint_path is not None:
        model.attnbench_checkpoint = load_checkpoint(model, checkpoint_path)
    return model


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Load a local state dict (:func:`attnbench.checkpoints.read_state_dict`) into ``model`` where
    names and shapes agree; see :func:`load_state`.

    Raises:
        ModelError: the file is missing or unreadable, or shares no weight with the model.
    """
    try:
        state = checkpoints.read_state_dict(path)
    except checkpoints.CheckpointError as err:
        raise ModelError(str(err)) from None
    return load_state(model, state, os.fspath(path))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Load ``state`` into ``model`` where names and shapes agree.

    Keys another timm ViT layout uses (OpenCLIP, DINOv2, ...) are mapped by timm's
    ``checkpoint_filter_fn`` first, when the state is not already in this model's own names.

    Returns a report ``{"path", "loaded", "missing", "unexpected", "mismatched"}`` (lists of
    keys): ``missing`` are the model's own keys the checkpoint lacks (a variant's extra
    parameters such as ``dconv.weight``), ``mismatched`` those skipped for a different shape
    (a classifier head for another number of classes).
    """
    own = model.state_dict()
    state = _timm_keys(model, state, own)
    match = checkpoints.match_state(own, state)
    if not match.loaded:
        raise ModelError(f"checkpoint '{source}' shares no parameter names and shapes with the model")
    model.load_state_dict({k: state[k] for k in match.loaded}, strict=False)
    return {"path": source, "loaded": list(match.loaded), "missing": list(match.new),
            "unexpected": list(match.unused), "mismatched": list(match.mismatched)}


def _timm_keys(model: nn.Module, state: dict[str, torch.Tensor], own: dict) -> dict[str, torch.Tensor]:
    if set(state) <= set(own) or not isinstance(model, VisionTransformer):
        return state
    try:
        return checkpoint_filter_fn(dict(state), model)
    except Exception:  # noqa: BLE001 - not a layout timm knows: matched by name as it is
        return state


def checkpoint_fit_problem(model: nn.Module, state: dict[str, torch.Tensor]) -> Optional[str]:
    """Why ``state`` does not fit ``model`` as its starting weights (one line), or None.

    It fits when every weight outside the attention layers and the classifier is in it with the
    model's shape and it has no weight the model lacks outside those: a variant's own new
    parameters (``dconv``) may be absent, and a classifier for another number of classes is
    started afresh. ``model`` may live on the meta device (shapes only).
    """
    own = model.state_dict()
    state = _timm_keys(model, state, own)
    match = checkpoints.match_state(own, state)
    attention = tuple(f"{name}." for name, _ in variant_layers(model))
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    free = lambda key: key.startswith(attention) or key.startswith(f"{classifier}.")  # noqa: E731
    wrong = [k for k in match.mismatched if not free(k)]
    if wrong:
        k = wrong[0]
        return (f"{len(wrong)} weight(s) have another shape than the model's, e.g. '{k}': checkpoint "
                f"{tuple(state[k].shape)}, model {tuple(own[k].shape)} (another architecture or model.kwargs?)")
    lacking = [k for k in match.new if not free(k)]
    if lacking:
        return f"it lacks {len(lacking)} of the model's weights, e.g. '{lacking[0]}' (another architecture?)"
    extra = [k for k in match.unused if not free(k)]
    if extra:
        return f"it has {len(extra)} weight(s) the model lacks, e.g. '{extra[0]}' (another architecture?)"
    return None


# --- swapping attention into a built model ------------------------------------------------------

@dataclasses.dataclass
class SwapReport:
    """What :func:`swap_attention` did.

    Attributes:
        model: the model (changed in place).
        replaced: qualified names of the attention modules replaced.
        kept_keys: state-dict keys carried over from the old modules (qkv, proj, norms).
        new_keys: keys of the new modules that had no counterpart (freshly initialised).
        dropped_keys: keys of the old modules the new ones do not have.
    """

    model: nn.Module
    replaced: list[str]
    kept_keys: list[str]
    new_keys: list[str]
    dropped_keys: list[str]


def _is_attention(module: nn.Module) -> bool:
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    return (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and hasattr(module, "num_heads")
            and qkv.out_features == 3 * qkv.in_features)


def swap_attention(model: nn.Module, variant: Union[str, type[AttentionVariant]], **options) -> SwapReport:
    """Replace every fused-qkv attention module of ``model`` by ``variant``, keeping its weights.

    Works on timm's ``Attention`` and on any :class:`AttentionVariant` (to move between
    variants). The new layer gets the old one's width, heads, biases, dropout rates and
    q/k/output norm modules; ``qkv`` and ``proj`` (and the norms) are loaded from the old layer
    with ``strict=False``; parameters only the variant has (e.g. ``dconv``) keep their fresh
    initialisation and are listed in ``new_keys``.

    Args:
        model: a built timm ViT (from a local checkpoint, say); changed in place.
        variant: registered name or variant class.
        **options: the variant's options.

    Raises:
        ModelError: the model has no fused-qkv attention module.
    """
    cls = registry.variant_class(variant, **options)
    targets = [(name, m) for name, m in model.named_modules() if name and _is_attention(m)]
    if not targets:
        raise ModelError(f"{type(model).__name__} has no attention module with a fused 'qkv' "
                         "(C -> 3C) and a 'proj' to swap")
    replaced, kept, new, dropped = [], [], [], []
    for name, old in targets:
        def has(attr):
            return not isinstance(getattr(old, attr, nn.Identity()), nn.Identity)

        drop = lambda attr: float(getattr(getattr(old, attr, None), "p", 0.0))  # noqa: E731
        layer = cls(old.qkv.in_features, num_heads=old.num_heads, qkv_bias=old.qkv.bias is not None,
                    proj_bias=old.proj.bias is not None, attn_drop=drop("attn_drop"), proj_drop=drop("proj_drop"))
        for attr in ("q_norm", "k_norm", "norm"):    # keep the exact norm modules (type, eps, weights)
            if has(attr):
                setattr(layer, attr, copy.deepcopy(getattr(old, attr)))
        weight = old.qkv.weight
        layer.to(device=weight.device, dtype=weight.dtype)
        old_state = old.state_dict()
        result = layer.load_state_dict(old_state, strict=False)
        layer.train(old.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        replaced.append(name)
        kept += [f"{name}.{k}" for k in old_state if k not in result.unexpected_keys]
        new += [f"{name}.{k}" for k in result.missing_keys]
        dropped += [f"{name}.{k}" for k in result.unexpected_keys]
    return SwapReport(model, replaced, kept, new, dropped)


# --- hooks over all layers ----------------------------------------------------------------------

def castle(model: nn.Module) -> nn.Module:
    """Switch every variant layer to its inference form (``castle()``); return the model."""
    for _, layer in variant_layers(model):
        layer.castle()
    return model


def castle_changes(model: nn.Module) -> bool:
    """:func:`castle` ``model`` in place and say whether that changed anything, so that a caller
    may reuse figures of the training form (softmax, linear-angular: no train-only branch).

    A layer whose class keeps the base :meth:`AttentionVariant.castle` (documented to do
    nothing) is unchanged. Any other layer is compared before and after: its weights and
    buffers, its sub-modules' names and types, and its other attributes (a ``castled`` flag, a
    schedule, hooks). An attribute that cannot be copied or compared counts as a change.
    """
    changed = False
    for _, layer in variant_layers(model):
        if type(layer).castle is AttentionVariant.castle:
            layer.castle()
            continue
        before = _layer_state(layer)
        layer.castle()
        changed = changed or before is None or not _same(before, _layer_state(layer))
    return changed


_MODULE_INTERNALS = ("_parameters", "_buffers", "_modules")


def _layer_state(layer: nn.Module) -> Optional[tuple]:
    """A copy of everything a ``castle()`` could change in place; None if it cannot be copied."""
    try:
        attributes = copy.deepcopy({k: v for k, v in vars(layer).items() if k not in _MODULE_INTERNALS})
    except Exception:  # noqa: BLE001 - an attribute deepcopy refuses: treat castling as a change
        return None
    structure = [(name, type(m)) for name, m in layer.named_modules()]
    tensors = {k: v.detach().clone() for k, v in layer.state_dict(keep_vars=True).items()}
    return structure, tensors, attributes


def _same(a: Any, b: Any) -> bool:
    """Equality that compares tensors by value (shape, dtype and elements) and never raises."""
    try:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                    and a.dtype == b.dtype and bool(torch.equal(a.detach().cpu(), b.detach().cpu())))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared count as changed
        return False


def set_progress(model: nn.Module, progress: float) -> None:
    """Tell every variant layer the training progress ``progress`` in [0, 1]."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must lie in [0, 1], got {progress}")
    for _, layer in variant_layers(model):
        layer.set_progress(progress)


def regularization(model: nn.Module) -> torch.Tensor:
    """Sum of every variant layer's auxiliary loss from its last forward (0 when none)."""
    terms = [layer.regularization() for _, layer in variant_layers(model)]
    if not terms:
        param = next(model.parameters(), None)
        return torch.zeros(()) if param is None else param.new_zeros(())
    return torch.stack([t.reshape(()) for t in terms]).sum()


def diagnostics(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{layer name: layer.diagnostics()}`` for every variant layer (last forward's scalars)."""
    return {name: dict(layer.diagnostics()) for name, layer in variant_layers(model)}
