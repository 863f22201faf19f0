"""Full precision: the baseline; changes nothing (and installs no quantizers)."""

from __future__ import annotations

from . import Method, add, options


@options
class FPOptions:
    """``conf/method/fp.yaml``: none."""


def check(state) -> dict:
    if not state.spec.is_fp:
        raise ValueError(f"method 'fp' takes bits=fp, got {state.spec.name!r}")
    return {"layers": 0}


add(Method("fp", FPOptions, lambda o: [check]))
