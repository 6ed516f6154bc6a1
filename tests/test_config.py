from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from harness.config import dump_yaml, from_dict, load_config, parse_overrides, read_yaml
from harness.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Opt:
    lr: float = dataclasses.field(default=1e-4, metadata={"min": 0.0})
    name: Literal["adamw", "sgd"] = "adamw"


@dataclasses.dataclass(frozen=True)
class Cfg:
    steps: int = dataclasses.field(default=10, metadata={"min": 1, "max": 1000})
    prompts: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = None
    optimizer: Opt = dataclasses.field(default_factory=Opt)
    flag: bool = False


def test_defaults_and_nested():
    c = from_dict(Cfg, {"steps": 5, "optimizer": {"lr": "1e-5"}, "prompts": ["a", "b"]})
    assert c.steps == 5 and c.optimizer.lr == 1e-5 and c.prompts == ("a", "b") and c.optimizer.name == "adamw"


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.lrr'; did you mean 'lr'"):
        from_dict(Cfg, {"optimizer": {"lrr": 1}}, where="r.yaml")


def test_wrong_type_names_key_value_and_expected():
    with pytest.raises(ConfigError, match=r"r.yaml: key 'steps' = 'ten': expected an integer"):
        from_dict(Cfg, {"steps": "ten"}, where="r.yaml")
    with pytest.raises(ConfigError, match=r"key 'flag' = 1: expected true or false"):
        from_dict(Cfg, {"flag": 1})
    with pytest.raises(ConfigError, match=r"key 'optimizer.name' = 'adam': expected one of 'adamw', 'sgd'"):
        from_dict(Cfg, {"optimizer": {"name": "adam"}})


def test_out_of_range():
    with pytest.raises(ConfigError, match=r"key 'steps' = 0: expected a value between 1 and 1000"):
        from_dict(Cfg, {"steps": 0})


def test_extends_overrides_and_roundtrip(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 7\noptimizer:\n  lr: 0.1\n  name: sgd\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\noptimizer:\n  lr: 0.2\n")
    c = load_config(Cfg, tmp_path / "child.yaml", ["seed=3", "optimizer.name=adamw"])
    assert (c.steps, c.optimizer.lr, c.optimizer.name, c.seed) == (7, 0.2, "adamw", 3)
    (tmp_path / "dump.yaml").write_text(dump_yaml(c))
    assert load_config(Cfg, tmp_path / "dump.yaml") == c


def test_extends_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        read_yaml(tmp_path / "a.yaml")


def test_bad_yaml_and_missing(tmp_path):
    (tmp_path / "bad.yaml").write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        read_yaml(tmp_path / "nope.yaml")


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=x"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["novalue"])
