"""Property tests for the YAML config loader every recipe and suite goes through.

Whatever a user writes, loading either succeeds or raises a one-line ConfigError; valid configs
round-trip through dump/load unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.config import dump_yaml, from_dict, parse_overrides
from harness.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Inner:
    rank: int = dataclasses.field(default=4, metadata={"min": 1, "max": 256})
    alpha: float = 4.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["to_q", "to_v"])


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "run"
    steps: int = dataclasses.field(default=10, metadata={"min": 1})
    lr: float = dataclasses.field(default=1e-4, metadata={"min": 0.0, "max": 1.0})
    mode: Literal["full", "lora"] = "full"
    seed: int | None = None
    flag: bool = False
    inner: Inner = dataclasses.field(default_factory=Inner)
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), c, max_size=4)),
                      max_leaves=12)
keys = st.one_of(st.sampled_from(["name", "steps", "lr", "mode", "seed", "flag", "inner", "extra", "stpes"]),
                 st.text(max_size=10))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=6))
def test_any_mapping_loads_or_fails_with_one_line_config_error(data):
    try:
        cfg = from_dict(Outer, data, where="fuzz.yaml")
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith("fuzz.yaml") and "\n" not in msg
    else:
        assert isinstance(cfg, Outer)


valid = st.builds(
    dict,
    name=st.text(min_size=1, max_size=10).filter(lambda s: s.strip() == s and s),
    steps=st.integers(1, 10**6),
    lr=st.floats(0.0, 1.0),
    mode=st.sampled_from(["full", "lora"]),
    seed=st.one_of(st.none(), st.integers(0, 2**31)),
    flag=st.booleans(),
    inner=st.builds(dict, rank=st.integers(1, 256), alpha=st.floats(-1e6, 1e6),
                    targets=st.lists(st.text(min_size=1, max_size=6), max_size=3)),
    extra=st.dictionaries(st.text(min_size=1, max_size=5), st.floats(-1e3, 1e3), max_size=3),
)


@settings(max_examples=100, deadline=None)
@given(valid)
def test_valid_configs_round_trip(data):
    cfg = from_dict(Outer, data)
    again = from_dict(Outer, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=5))
def test_overrides_parse_or_fail_cleanly(items):
    try:
        out = parse_overrides(items)
    except ConfigError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(out, dict)
