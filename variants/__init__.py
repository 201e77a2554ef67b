"""attnbench's built-in attention variants (import name ``attnbench_variants``).

They are registered through the ``attnbench.variants`` entry-point group in attnbench's own
``pyproject.toml``, exactly as a third-party plugin registers its variants: attnbench never
imports this package by name.
"""
