"""What result rows say about the variants that produced them: the distribution each came from,
and the hint an unknown-variant error gives from a study's earlier rows."""
from __future__ import annotations

from typing import Optional

from attnbench.results.schema import names

__all__ = ["recorded_distributions", "missing_variant_hint"]


def recorded_distributions(rows, variant: Optional[str] = None) -> list[str]:
    """The distributions result rows say their variants came from (column ``variant_distribution``).

    Args:
        rows: a DataFrame of result rows with a ``variant`` column.
        variant: only rows of this variant (``"dist:name"`` or ``name``); None: every row.

    Returns:
        Sorted distribution names; ``[]`` when the rows do not record them (older rows).
    """
    (column,) = names("variant_distribution")
    if column not in getattr(rows, "columns", ()):
        return []
    if variant is not None and "variant" in rows.columns:
        bare = variant.rpartition(":")[2]
        rows = rows[rows["variant"].map(lambda v: str(v).rpartition(":")[2]) == bare]
    return sorted({str(d) for d in rows[column].dropna() if str(d)})


def missing_variant_hint(variant: str, rows) -> str:
    """For an unknown-variant error about a study with earlier rows: which distribution ran
    ``variant`` then, e.g. ``"; the study's rows ran 'hydra' from distribution 'attnbench-hydra'"``;
    ``""`` when the rows do not say.
    """
    dists = recorded_distributions(rows, variant)
    if not dists:
        return ""
    listed = " or ".join(f"'{d}'" for d in dists)
    return f"; the study's rows ran '{variant.rpartition(':')[2]}' from distribution {listed} (is it installed?)"
