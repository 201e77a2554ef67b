"""attnbench: benchmark and ablate attention variants inside timm vision transformers.

The public API is re-exported here; the modules behind it are private to the package layout.
"""
from attnbench.registry import (
    ENTRY_POINT_GROUP,
    VariantError,
    build_attention,
    get_variant,
    list_variants,
    register_variant,
    variant_class,
    variant_info,
)
from attnbench.variant import AttentionVariant, OptionSpec, option_specs, preset

__version__ = "0.1.0"

__all__ = [
    "AttentionVariant",
    "ENTRY_POINT_GROUP",
    "OptionSpec",
    "VariantError",
    "build_attention",
    "get_variant",
    "list_variants",
    "option_specs",
    "preset",
    "register_variant",
    "variant_class",
    "variant_info",
]
