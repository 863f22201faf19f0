"""What the study tables share between ``report`` (which builds them) and ``findings`` (which checks
them): the names of the average and drop columns, the drop formula and the base/instruct pairing."""

from __future__ import annotations

import math
import re

import pandas as pd

AVG, DROP = "avg", "drop %"


def relative_drop(value: float, fp: float, lower: bool = False) -> float:
    """100 * relative degradation of ``value`` against ``fp`` (positive = worse); NaN if undefined."""
    if pd.isna(value) or pd.isna(fp) or fp == 0:
        return math.nan
    return 100 * ((value - fp) if lower else (fp - value)) / fp


def model_variant(model: str) -> tuple[str, str | None]:
    """(stem, "base" | "instruct") of a model name ending -base / -instruct, else (name, None)."""
    m = re.fullmatch(r"(.+?)[-_](base|instruct)", str(model), re.IGNORECASE)
    return (m.group(1), m.group(2).lower()) if m else (str(model), None)


def variant_pairs(tables: list[pd.DataFrame]) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """(base, instruct) study tables of one model stem evaluated in one setting."""
    by = {(t.attrs["stem"], t.attrs["setting"], t.attrs["variant"]): t for t in tables}
    return [(table, by[(stem, setting, "instruct")]) for (stem, setting, variant), table in by.items()
            if variant == "base" and (stem, setting, "instruct") in by]
