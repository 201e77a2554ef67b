"""Every registered variant passes the conformance suite that plugin authors use."""
from attnbench.registry import list_variants
from attnbench.testing import VariantConformance

# One test class per registered variant: a new variant is covered without new code.
for _name in list_variants():
    _cls = type(f"TestConformance_{_name.replace('-', '_')}", (VariantConformance,), {"variant": _name})
    globals()[_cls.__name__] = _cls
