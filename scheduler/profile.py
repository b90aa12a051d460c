"""Profiles: a policy described in YAML, like llm-d's scheduler config.

    name: ours
    filters: [model, routable, {name: role, params: {allowed: [both, decode]}}]
    scorers:
      - {name: ttft, weight: 1.0, params: {prefill_tokens_per_s: 10000}}
      - {name: session-affinity, weight: 0.05}
    picker: {name: max-score, params: {tie_break: lru}}
    speculative: {ttl_s: 20}        # optional: remember routed prefixes until KV events confirm them
    disaggregation: {remote_prefill_min_tokens: 64, max_prefill_queue: 8}   # optional: P/D thresholds
    planner: {ttft_p90_s: 2.0, itl_p90_s: 0.05}   # optional: scaling planner (scheduler/PLANNER.md)

A rule-based peer (scheduler/policies.py: sglang, mooncake), whose rule is not a weighted sum,
is named by `rule:` with its constructor's params instead of filters/scorers/picker:

    name: mooncake
    rule: mooncake
    params: {step_overhead_s: 0.002, prefill_tokens_per_s: 10000}

`filters` defaults to [model, routable, role]; `picker` to max-score. A weight
is a finite number >= 0 (0 disables a scorer). Names and params are checked
at load time; any mistake raises ProfileError naming the bad entry.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import yaml

from scheduler.disagg import DisaggConfig
from scheduler.filters import DEFAULT_FILTERS, FILTERS
from scheduler.planner import PlannerConfig
from scheduler.framework import Policy, ProfilePolicy
from scheduler.pickers import PICKERS
from scheduler.scorers import SCORERS
from scheduler.speculative import SpeculativePrefixes

PROFILES_DIR = pathlib.Path(__file__).with_name("profiles")
_KEYS = {"name", "description", "filters", "scorers", "picker", "speculative", "disaggregation", "planner"}
_RULE_KEYS = {"name", "description", "rule", "params"}


class ProfileError(ValueError):
    """A profile that can't be loaded; the message says which entry and why."""


def load_profile(source: str | pathlib.Path | Mapping[str, Any]) -> Policy:
    """A policy from a profile: a mapping, a YAML file, or a shipped one's name (profiles/<name>.yaml)."""
    spec, where = _read(source)
    if not isinstance(spec, Mapping):
        raise ProfileError(f"{where}: a profile is a mapping, got {type(spec).__name__}")
    if "rule" in spec:
        return _rule_policy(spec, where)
    unknown = set(spec) - _KEYS
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    name = str(spec.get("name") or (pathlib.Path(where).stem if where.endswith(".yaml") else "custom"))
    filters = [_build(FILTERS, "filter", entry, where) for entry in spec.get("filters", DEFAULT_FILTERS)]
    scorers = []
    raw_scorers = spec.get("scorers") or []
    if not isinstance(raw_scorers, list):
        raise ProfileError(f"{where}: scorers must be a list")
    for entry in raw_scorers:
        scorer = _build(SCORERS, "scorer", entry, where)
        weight = entry.get("weight", 1.0) if isinstance(entry, Mapping) else 1.0
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not number or not math.isfinite(weight) or weight < 0:
            raise ProfileError(f"{where}: scorer {scorer.name!r} has weight {weight!r}; "
                               "a weight is a finite number >= 0")
        scorers.append((scorer, float(weight)))
    picker = _build(PICKERS, "picker", spec.get("picker", "max-score"), where)
    overlay = None
    spec_cfg = spec.get("speculative")
    if spec_cfg:
        params = {} if spec_cfg is True else spec_cfg
        try:
            overlay = SpeculativePrefixes(**params)
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"{where}: speculative: {exc}") from None
    policy = ProfilePolicy(name, filters, scorers, picker, overlay)
    policy.disagg = _config_section(DisaggConfig, spec, "disaggregation", where)
    policy.planner = _config_section(PlannerConfig, spec, "planner", where)
    return policy


def _rule_policy(spec: Mapping[str, Any], where: str) -> Policy:
    """A rule-based peer from `rule:` and its constructor's `params:`."""
    from scheduler.policies import RULE_POLICIES  # policies.py imports this module

    unknown = set(spec) - _RULE_KEYS
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {sorted(unknown)} beside rule; allowed: {sorted(_RULE_KEYS)}")
    rule = spec["rule"]
    cls = RULE_POLICIES.get(rule) if isinstance(rule, str) else None
    if cls is None:
        raise ProfileError(f"{where}: unknown rule {rule!r}; known: {', '.join(sorted(RULE_POLICIES))}")
    params = spec.get("params") or {}
    if not isinstance(params, Mapping):
        raise ProfileError(f"{where}: rule {rule!r}: params must be a mapping, got {params!r}")
    if "filters" in params:  # names or {name, params}, as in a weighted profile
        filters = params["filters"]
        if not isinstance(filters, list):
            raise ProfileError(f"{where}: rule {rule!r}: filters must be a list")
        params = {**params, "filters": [_build(FILTERS, "filter", entry, where) for entry in filters]}
    try:
        policy = cls(**params)
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"{where}: rule {rule!r}: bad params {dict(params)}: {exc}") from None
    policy.name = str(spec.get("name") or rule)
    return policy


def _config_section(config: type, spec: Mapping[str, Any], key: str, where: str) -> Any:
    """The dataclass `config` from the profile's `key:` mapping (absent or `true`: its defaults);
    the ProfileError names the bad key."""
    section = spec.get(key)
    if section is None or section is True:
        return config()
    if not isinstance(section, Mapping):
        raise ProfileError(f"{where}: {key} must be a mapping, got {section!r}")
    known = {f.name for f in dataclasses.fields(config)}
    unknown = set(section) - known
    if unknown:
        raise ProfileError(f"{where}: {key}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
    try:
        return config(**section)
    except ValueError as exc:
        raise ProfileError(f"{where}: {key}: {exc}") from None


def _read(source: str | pathlib.Path | Mapping[str, Any]) -> tuple[Any, str]:
    if isinstance(source, Mapping) or not isinstance(source, (str, pathlib.Path)):
        return source, "profile"
    path = pathlib.Path(source)
    if not path.exists() and isinstance(source, str) and "/" not in source and not source.endswith(".yaml"):
        path = PROFILES_DIR / f"{source}.yaml"
        if not path.exists():
            shipped = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
            raise ProfileError(f"no profile {source!r}: not a file, nor a shipped profile "
                               f"({', '.join(shipped)})")
    try:
        return yaml.safe_load(path.read_text()), str(path)
    except OSError as exc:
        raise ProfileError(f"can't read profile {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None


def _build(registry: Mapping[str, Any], kind: str, entry: Any, where: str) -> Any:
    """An instance from `name` or {name, params} (a scorer entry may also carry `weight`)."""
    if isinstance(entry, str):
        name, params = entry, {}
    elif isinstance(entry, Mapping) and "name" in entry:
        extra = set(entry) - {"name", "params", "weight" if kind == "scorer" else "name"}
        if extra:
            raise ProfileError(f"{where}: {kind} {entry['name']!r}: unknown key(s) {sorted(extra)}")
        name, params = entry["name"], entry.get("params") or {}
    else:
        raise ProfileError(f"{where}: a {kind} is a name or a mapping with 'name', got {entry!r}")
    cls = registry.get(name)
    if cls is None:
        raise ProfileError(f"{where}: unknown {kind} {name!r}; known: {', '.join(sorted(registry))}")
    if not isinstance(params, Mapping):
        raise ProfileError(f"{where}: {kind} {name!r}: params must be a mapping, got {params!r}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ProfileError(f"{where}: {kind} {name!r}: bad params {dict(params)}: {exc}") from None
    except ValueError as exc:
        raise ProfileError(f"{where}: {kind} {name!r}: {exc}") from None
