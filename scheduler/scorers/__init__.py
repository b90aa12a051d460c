"""Scorers: each gives every eligible worker a score in [0, 1], higher is better. See README.md."""

from __future__ import annotations

from typing import Any

from scheduler.scorers.kv_cost import KVCostScorer
from scheduler.scorers.kv_utilization import KVUtilizationScorer
from scheduler.scorers.load import LoadScorer
from scheduler.scorers.prefix import PrefixCacheScorer
from scheduler.scorers.queue import QueueScorer
from scheduler.scorers.running import RunningScorer
from scheduler.scorers.session import SessionAffinityScorer
from scheduler.scorers.ttft import TTFTScorer

SCORERS: dict[str, Any] = {s.name: s for s in (
    PrefixCacheScorer, QueueScorer, RunningScorer, KVUtilizationScorer, LoadScorer, SessionAffinityScorer,
    TTFTScorer, KVCostScorer,
)}

__all__ = ["SCORERS", "KVCostScorer", "KVUtilizationScorer", "LoadScorer", "PrefixCacheScorer", "QueueScorer",
           "RunningScorer", "SessionAffinityScorer", "TTFTScorer"]
