"""Every built-in variant passes the conformance suite that plugin authors use. Installed
third-party plugins are not run here: each runs the same suite in its own tests (see
examples/attnbench-hydra/tests/test_conformance.py)."""
from attnbench.registry import BUILTIN_DISTRIBUTION, list_variants
from attnbench.testing import VariantConformance

# One test class per built-in variant: a new variant is covered without new code.
for _name in list_variants(BUILTIN_DISTRIBUTION):
    _cls = type(f"TestConformance_{_name.replace('-', '_')}", (VariantConformance,), {"variant": _name})
    globals()[_cls.__name__] = _cls
