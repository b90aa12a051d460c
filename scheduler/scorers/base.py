"""Helpers shared by the scorers."""

from __future__ import annotations

from collections.abc import Mapping

from scheduler.index import Tier


def tier_weights(given: Mapping[str, float] | None, default: Mapping[Tier, float]) -> list[float]:
    """A per-tier list from a {tier name: value} mapping (engine/host/disk/store), defaults filled in."""
    out = [float(default[t]) for t in Tier]
    for key, value in (given or {}).items():
        try:
            t = Tier[str(key).upper()]
        except KeyError:
            raise ValueError(f"unknown tier {key!r}; use engine, host, disk or store") from None
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"tier weight for {key} must be a number >= 0, got {value!r}")
        out[t] = float(value)
    return out
