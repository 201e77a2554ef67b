"""attnbench's conformance suite (shapes, gradients, options, castle, MACs, timm drop-in)."""
from attnbench.testing import VariantConformance


class TestHydra(VariantConformance):
    variant = "hydra"


class TestHydraPerHeadNorm(VariantConformance):
    variant = "hydra"
    options = {"normalize": "head"}
