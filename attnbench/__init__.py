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
    unregister_variant,
    variant_class,
    variant_info,
)

__version__ = "0.1.0"

# The variant contract imports torch; it is loaded on first use so that the command line (and
# anything reading results) starts without torch.
_FROM_VARIANT = ("AttentionVariant", "OptionSpec", "option_specs", "preset")


def __getattr__(name: str):
    if name in _FROM_VARIANT:
        from attnbench import variant

        return getattr(variant, name)
    raise AttributeError(f"module 'attnbench' has no attribute '{name}'")

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
    "unregister_variant",
    "variant_class",
    "variant_info",
]
