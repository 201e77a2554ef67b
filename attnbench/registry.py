"""The variant registry: one front door to every attention variant, built-in or plugin.

Variants are found through the ``attnbench.variants`` entry-point group (the built-in ones
too) and loaded lazily, on first use. :func:`register_variant` adds a class in-process, for
notebooks and tests, and :func:`unregister_variant` takes it away again.

Importing this module imports neither torch nor the variant contract (``attnbench.variant``):
listing and resolving names stays cheap for the command line; loading a class imports them.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from attnbench.suggest import did_you_mean

if TYPE_CHECKING:
    from attnbench.variant import AttentionVariant

__all__ = [
    "ENTRY_POINT_GROUP",
    "DEFAULT_VARIANT",
    "BUILTIN_DISTRIBUTION",
    "VariantError",
    "VariantInfo",
    "register_variant",
    "list_variants",
    "variant_distributions",
    "unregister_variant",
    "get_variant",
    "variant_info",
    "build_attention",
    "variant_class",
    "refresh",
]

ENTRY_POINT_GROUP = "attnbench.variants"
BUILTIN_DISTRIBUTION = "attnbench"
LOCAL_DISTRIBUTION = "in-process"   # the distribution of a variant added by register_variant
#: The attention a model gets when none is named (timm's own softmax), and a conversion's teacher.
DEFAULT_VARIANT = "softmax"


class VariantError(ValueError):
    """An unknown, ambiguous or broken variant; the message says which and why."""


@dataclasses.dataclass
class _Entry:
    name: str
    distribution: str
    target: str
    load: Callable[[], Any]
    version: Optional[str] = None   # the distribution's version (None in-process)


@dataclasses.dataclass(frozen=True)
class VariantInfo:
    """What the registry knows of one variant (loading it if needed)."""

    name: str
    distribution: str
    target: str
    cls: type[AttentionVariant]
    version: Optional[str] = None   #: the distribution's version (None for in-process variants)

    @property
    def description(self) -> str:
        return self.cls.description()

    @property
    def options(self):
        from attnbench.variant import option_specs

        return option_specs(self.cls)


_local: dict[str, _Entry] = {}
_discovered: Optional[dict[str, list[_Entry]]] = None
_loaded: dict[str, type[AttentionVariant]] = {}


def register_variant(cls=None, *, name: Optional[str] = None):
    """Register a variant class in this process; usable as ``@register_variant`` or
    ``@register_variant(name="my-attn")``. Plugins should use the entry-point group instead.
    """

    def add(variant_cls):
        key = name or variant_cls.__name__
        _validate_class(key, LOCAL_DISTRIBUTION, variant_cls)
        existing = _local.get(key)
        if existing is not None and existing.load() is not variant_cls:
            raise VariantError(f"variant '{key}' is already registered in-process by {existing.target}")
        _local[key] = _Entry(key, LOCAL_DISTRIBUTION, f"{variant_cls.__module__}.{variant_cls.__qualname__}",
                             lambda: variant_cls)
        _loaded.pop(key, None)
        return variant_cls

    return add(cls) if cls is not None else add


def unregister_variant(name: str) -> None:
    """Take back a variant :func:`register_variant` added in this process (tests, notebooks);
    the installed variant of that name, if any, is seen again.

    Raises:
        VariantError: no variant of that name was registered in-process.
    """
    if _local.pop(name, None) is None:
        raise VariantError(f"no variant '{name}' is registered in-process")
    _loaded.clear()   # also any "dist:name" spelling of it


def refresh() -> None:
    """Forget discovered entry points and loaded classes (after installing a plugin)."""
    global _discovered
    _discovered = None
    _loaded.clear()


def _discover() -> dict[str, list[_Entry]]:
    global _discovered
    if _discovered is None:
        found: dict[str, list[_Entry]] = {}
        seen: set[str] = set()
        # Walk distributions ourselves: entry_points(group=...) keeps one entry per name and
        # would hide a second distribution claiming the same name.
        for dist in importlib.metadata.distributions():
            dist_name = dist.metadata["Name"] or "(unnamed distribution)"
            key = dist_name.lower().replace("_", "-")
            if key in seen:  # the same distribution further down sys.path
                continue
            seen.add(key)
            for ep in dist.entry_points:
                if ep.group == ENTRY_POINT_GROUP:
                    found.setdefault(ep.name, []).append(_Entry(ep.name, dist_name, ep.value, ep.load, dist.version))
        for name, entries in found.items():
            if len(entries) > 1:
                _warn_conflict(name, entries)
        _discovered = found
    return _discovered


def _warn_conflict(name: str, entries: list[_Entry]) -> None:
    dists = " and ".join(f"'{e.distribution}' ({e.target})" for e in entries)
    builtin = [e for e in entries if e.distribution == BUILTIN_DISTRIBUTION]
    outcome = ("the built-in one is used" if builtin
               else f"use a qualified name such as '{entries[0].distribution}:{name}'")
    warnings.warn(f"attnbench: variant name '{name}' is claimed by {dists}; {outcome}", stacklevel=3)


def _entries() -> dict[str, list[_Entry]]:
    merged = {name: list(entries) for name, entries in _discover().items()}
    for name, entry in _local.items():
        merged.setdefault(name, [])
        merged[name] = [entry] + [e for e in merged[name] if e.distribution != entry.distribution]
    return merged


def list_variants(distribution: Optional[str] = None) -> list[str]:
    """Sorted names of all registered variants (no variant module is imported)."""
    return sorted(
        name for name, entries in _entries().items()
        if distribution is None or any(e.distribution == distribution for e in entries)
    )


def variant_distributions() -> list[str]:
    """Sorted names of the distributions that provide variants (``attnbench`` and the plugins)."""
    return sorted({e.distribution for entries in _entries().values() for e in entries})


def _resolve(name: str) -> _Entry:
    dist, _, bare = name.rpartition(":")
    entries = _entries().get(bare)
    if not entries:
        raise VariantError(f"unknown variant '{name}'{did_you_mean(bare, _entries())} "
                           f"(known: {', '.join(list_variants())}); a plugin providing it may not be installed "
                           f"(installed variant distributions: {', '.join(variant_distributions())})")
    if dist:
        chosen = [e for e in entries if e.distribution == dist]
        if not chosen:
            raise VariantError(f"variant '{bare}' is not provided by distribution '{dist}' "
                               f"(provided by: {', '.join(e.distribution for e in entries)})")
        return chosen[0]
    if len(entries) == 1 or entries[0].distribution == LOCAL_DISTRIBUTION:
        return entries[0]
    builtin = [e for e in entries if e.distribution == BUILTIN_DISTRIBUTION]
    if builtin:
        return builtin[0]
    dists = " and ".join(f"'{e.distribution}'" for e in entries)
    raise VariantError(f"variant name '{bare}' is claimed by {dists}; qualify it, e.g. "
                       f"'{entries[0].distribution}:{bare}'")


def _validate_class(name: str, distribution: str, obj: Any) -> None:
    from attnbench.variant import AttentionVariant, option_specs

    if not (isinstance(obj, type) and issubclass(obj, AttentionVariant)):
        raise VariantError(f"variant '{name}' from distribution '{distribution}' is {obj!r}, "
                           f"not a subclass of attnbench.AttentionVariant")
    try:
        option_specs(obj)
    except TypeError as err:
        raise VariantError(f"variant '{name}' from distribution '{distribution}': {err}") from None


def get_variant(name: str) -> type[AttentionVariant]:
    """The variant class registered as ``name`` (``"dist:name"`` picks one distribution).

    Raises:
        VariantError: unknown name (with the closest matches), an ambiguous name, or a plugin
            that fails to import or is not a variant (naming its distribution).
    """
    if name in _loaded:
        return _loaded[name]
    entry = _resolve(name)
    try:
        obj = entry.load()
    except Exception as err:  # a broken plugin must not take attnbench down with it
        raise VariantError(f"variant '{entry.name}' from distribution '{entry.distribution}' "
                           f"failed to load ({entry.target}): {type(err).__name__}: {err}") from err
    _validate_class(entry.name, entry.distribution, obj)
    from attnbench.variant import remember_variant_name

    remember_variant_name(obj, entry.name)
    _loaded[name] = obj
    return obj


def variant_info(name: str) -> VariantInfo:
    """Name, distribution, entry-point target, class and distribution version of a variant."""
    entry = _resolve(name)
    return VariantInfo(entry.name, entry.distribution, entry.target, get_variant(name), entry.version)


def variant_class(variant: Union[str, type[AttentionVariant]], **options) -> type[AttentionVariant]:
    """A class with ``options`` bound, for ``timm.create_model(..., attn_layer=...)``.

    Args:
        variant: a registered name or a variant class.
        **options: the variant's options; validated now.
    """
    cls = get_variant(variant) if isinstance(variant, str) else variant
    if not options:
        return cls
    from attnbench.variant import preset

    return preset(cls, cls.description(), **options)


def build_attention(variant: Union[str, type[AttentionVariant]], dim: int, num_heads: int = 8,
                    **options) -> AttentionVariant:
    """Build one attention layer: ``build_attention("castling", 192, 3, mask_schedule="fixed")``.

    Keyword options are timm's (qkv_bias, qk_norm, attn_drop, proj_drop, ...) and the variant's.
    """
    cls = get_variant(variant) if isinstance(variant, str) else variant
    return cls(dim, num_heads=num_heads, **options)
