"""Recipes and suites with every kind of mistake give one line and exit code 2 from the CLI; the recipe
and suite loaders and the grid axis parser never raise anything but ConfigError (hypothesis), and what
loads round-trips."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from _rel_helpers import run_cli
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from harness.cli import main
from harness.config import dump_yaml, to_dict
from harness.errors import ConfigError
from harness.eval.suite import Suite, load_suite
from harness.generate.axes import AXES, parse_axis
from harness.train.recipe import Recipe, load_recipe

GOOD_RECIPE = "model: {source: zoo/sd}\ndata: {root: data}\noutput_dir: runs/x\n"
GOOD_SUITE = ("name: s\nprompts:\n  generic: {prompts: [a cat, a dog]}\nmetrics:\n  clip_score: {}\n")

RECIPES = [  # (file body, fragment the one-line error must contain)
    (GOOD_RECIPE + "train: {max_stpes: 10}\n", "unknown key 'train.max_stpes'; did you mean 'max_steps'"),
    (GOOD_RECIPE + "trian: {lr: 1.0e-4}\n", "unknown key 'trian'; did you mean 'train'"),
    (GOOD_RECIPE + "train: {batch_size: four}\n", "key 'train.batch_size' = 'four': expected an integer"),
    (GOOD_RECIPE + "train: {lr: fast}\n", "key 'train.lr' = 'fast': expected a number"),
    (GOOD_RECIPE + "train: {lr: .nan}\n", "key 'train.lr' = nan: expected a finite number"),
    (GOOD_RECIPE + "lora: {enabled: yes please}\n", "key 'lora.enabled' = 'yes please': expected true or false"),
    (GOOD_RECIPE + "train: {lr_scheduler: cosin}\n", "key 'train.lr_scheduler' = 'cosin': expected one of"),
    (GOOD_RECIPE + "data: {root: d, resolution: 4}\n", "key 'data.resolution' = 4: expected a value between 8"),
    (GOOD_RECIPE + "train: {lr: 5}\n", "key 'train.lr' = 5.0: expected a value between 0.0 and 1.0"),
    (GOOD_RECIPE + "data: {root: d, resolution: 100}\n", "expected a multiple of 8"),
    (GOOD_RECIPE + "train: {t_min: 500, t_max: 100}\n", "key 'train.t_max' = 100: expected more than"),
    (GOOD_RECIPE + "lora: {text_encoder: true}\n", "needs lora.enabled=true"),
    (GOOD_RECIPE + "lora: {unet_targets: to_q}\n", "key 'lora.unet_targets' = 'to_q': expected a list"),
    (GOOD_RECIPE + "stages: [{name: a}, {name: a}]\n", "stage names must be unique"),
    ("model: zoo/sd\ndata: {root: d}\noutput_dir: x\n", "key 'model' = 'zoo/sd': expected a mapping"),
    ("data: {root: d}\noutput_dir: x\n", "missing required key 'model'"),
    ("extends: nowhere.yaml\n" + GOOD_RECIPE, "nowhere.yaml: file not found"),
    ("extends: bad.yaml\n", "forms a cycle"),
    ("extends: 42\n" + GOOD_RECIPE, "key 'extends' = 42: expected a path to another YAML file"),
    ("train: [unclosed\n", "not valid YAML"),
    ("model: {source: a}\n  bad indent: 1\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping of keys at the top level, got list"),
    ('"\\xff": 1\n' + GOOD_RECIPE, "unknown key '\xff'"),
]


def _write(tmp_path: Path, body: str | bytes, name: str = "bad.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8"))
    return p


def _one_line_error(capsys, rc: int, command: str, fragment: str, path: Path) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"harness {command}: error: "), lines[0]
    assert path.name in lines[0] or "extends" in path.read_text(errors="replace"), lines[0]  # names the file
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("body, fragment", RECIPES, ids=[f"recipe{i}" for i in range(len(RECIPES))])
def test_bad_recipe_is_one_line_exit_2(tmp_path, capsys, body, fragment):
    path = _write(tmp_path, body)
    _one_line_error(capsys, main(["train", str(path), "--print-recipe"]), "train", fragment, path)


def test_bad_recipe_override_and_non_utf8_file(tmp_path, capsys):
    path = _write(tmp_path, GOOD_RECIPE)
    _one_line_error(capsys, main(["train", str(path), "train.lr=abc", "--print-recipe"]), "train",
                    "key 'train.lr' = 'abc': expected a number", path)
    _one_line_error(capsys, main(["train", str(path), "train.nope=1", "--print-recipe"]), "train",
                    "unknown key 'train.nope'", path)
    latin = _write(tmp_path, b"model: {source: caf\xe9}\n", "latin.yaml")
    _one_line_error(capsys, main(["train", str(latin), "--print-recipe"]), "train", "cannot read", latin)


SUITES = [
    (GOOD_SUITE + "metircs: {}\n", "unknown key 'metircs'; did you mean 'metrics'"),
    (GOOD_SUITE + "seeds: zero\n", "key 'seeds' = 'zero': expected a list of int"),
    (GOOD_SUITE + "seeds: [1, 1]\n", "seeds repeat"),
    (GOOD_SUITE + "generation: {width: 4}\n", "key 'generation.width' = 4: expected a value between 8 and 4096"),
    (GOOD_SUITE + "generation: {width: 100}\n", "must be divisible by 8"),
    (GOOD_SUITE + "generation: {dtype: fp8}\n", "key 'generation.dtype' = 'fp8': expected one of"),
    (GOOD_SUITE + "ci: {alpha: 2}\n", "key 'ci.alpha' = 2.0: expected a value between 0.001 and 0.5"),
    (GOOD_SUITE + "gates: {fid: {max: 1}}\n", "key 'gates.fid': no metric labelled 'fid'"),
    (GOOD_SUITE + "gates: {clip_score: {}}\n", "give at least one of"),
    (GOOD_SUITE.replace("clip_score: {}", "clip_scor: {}"), "unknown metric 'clip_scor'; known metrics:"),
    (GOOD_SUITE.replace("{prompts: [a cat, a dog]}", "{prompts: [a], file: p.txt}"), "exactly one of"),
    (GOOD_SUITE.replace("{prompts: [a cat, a dog]}", "{file: nothere.txt}"), "no such file"),
    (GOOD_SUITE.replace("generic:", "'bad label!':"), "label 'bad label!'"),
    (GOOD_SUITE + "reference: {folder: nofolder}\n", "key 'reference.folder' = 'nofolder': not a folder"),
    ("extends: gone.yaml\n" + GOOD_SUITE, "gone.yaml: file not found"),
    ("name: [unclosed\n", "not valid YAML"),
    ("prompts: {}\nmetrics: {}\n", "missing required key 'name'"),
]


@pytest.mark.parametrize("body, fragment", SUITES, ids=[f"suite{i}" for i in range(len(SUITES))])
def test_bad_suite_is_one_line_exit_2(tmp_path, capsys, body, fragment):
    path = _write(tmp_path, body)
    rc = main(["eval", str(path), "--base", str(tmp_path / "base"), "--candidate", str(tmp_path / "c"),
               "--out", str(tmp_path / "out")])
    _one_line_error(capsys, rc, "eval", fragment, path)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_real_process_exit_codes_and_no_traceback(tmp_path):
    recipe = _write(tmp_path, RECIPES[0][0], "r.yaml")
    suite = _write(tmp_path, SUITES[0][0], "s.yaml")
    for argv, fragment in ((["train", recipe, "--print-recipe"], RECIPES[0][1]),
                           (["eval", suite, "--base", "b", "--candidate", "c", "--out", tmp_path / "o"],
                            SUITES[0][1])):
        proc = run_cli(argv, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- property tests ---------------------------------------------------------------------------------

junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12)),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c, max_size=3)),
    max_leaves=6)


def typed(tp, depth: int = 0, junky: bool = True, lo=None, hi=None) -> st.SearchStrategy:
    """Values of the annotated type within the field's bounds; with ``junky``, mixed with junk of any
    type (so the loader gets past type checks into bounds and cross-field rules, and also fails them)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return st.one_of(*[typed(a, depth, junky, lo, hi) for a in get_args(tp)])
    if tp is type(None):
        return st.none()
    if origin is Literal:
        return st.sampled_from(get_args(tp))
    if dataclasses.is_dataclass(tp):
        return mapping(tp, depth + 1, junky)
    if origin in (list, tuple):
        return st.lists(typed(get_args(tp)[0], depth, junky), max_size=3)
    if origin is dict:
        return st.dictionaries(LABEL, typed(get_args(tp)[-1], depth, junky), max_size=2)
    lo_i = -5 if lo is None else int(lo)
    lo_f = -10.0 if lo is None else float(lo)
    base = {bool: st.booleans(), int: st.integers(lo_i, 5000 if hi is None else min(int(hi), 5000)),
            float: st.floats(lo_f, 10.0 if hi is None else min(float(hi), 10.0), allow_nan=False),
            str: st.text(max_size=10), Any: st.one_of(st.integers(), st.text(max_size=5))}.get(tp, junk)
    return st.one_of(base, base, junk) if junky and depth < 3 else base


LABEL = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,6}", fullmatch=True)


def mapping(cls, depth: int = 0, junky: bool = True) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]

    def value(f):
        return typed(hints[f.name], depth, junky, f.metadata.get("min"), f.metadata.get("max"))

    required = {f.name: value(f) for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    optional = {f.name: value(f) for f in fields if f.name not in required}
    typo = st.dictionaries(st.sampled_from([f.name[:-1] + "x" for f in fields]), junk, max_size=1)
    return st.builds(lambda a, b: {**a, **b}, st.fixed_dictionaries(required, optional=optional),
                     st.one_of(st.just({}), typo) if junky and depth < 2 else st.just({}))


# Suites have cross-field rules a generic strategy rarely satisfies; this one builds valid ones.
_dims = st.integers(1, 64).map(lambda k: 8 * k)
valid_suite = st.fixed_dictionaries(
    {"name": st.text(min_size=1, max_size=8),
     "prompts": st.dictionaries(LABEL, st.fixed_dictionaries({"prompts": st.lists(st.text(max_size=12), min_size=1,
                                                                                     max_size=3)}),
                                min_size=1, max_size=2),
     "metrics": st.dictionaries(st.sampled_from(["clip_score", "fid", "kid", "cmmd"]), st.just({}), max_size=2)},
    optional={"seeds": st.lists(st.integers(0, 2**31), min_size=1, max_size=3, unique=True),
              "generation": st.fixed_dictionaries({}, optional={"width": _dims, "height": _dims,
                                                                "steps": st.integers(1, 1000),
                                                                "cfg": st.floats(0, 100)}),
              "ci": mapping(Suite.__dataclass_fields__["ci"].default_factory().__class__, 1, junky=False),
              "xray": mapping(Suite.__dataclass_fields__["xray"].default_factory().__class__, 1, junky=False),
              "description": st.text(max_size=20), "version": st.text(min_size=1, max_size=4)})


def _has_nan(obj) -> bool:
    return "NaN" in json.dumps(to_dict(obj), default=str)


_files = itertools.count()


def _load_roundtrip(folder: Path, data, loader):
    path = folder / f"cfg{next(_files)}.yaml"
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        assume(False)
    path.write_text(text, encoding="utf-8")
    try:
        cfg = loader(path)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
        return
    if not _has_nan(cfg):  # what loads, dumps and loads back to the same config
        again = folder / f"again{next(_files)}.yaml"
        again.write_text(dump_yaml(cfg), encoding="utf-8")
        assert loader(again) == cfg


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.one_of(mapping(Recipe), mapping(Recipe, junky=False)))
def test_recipe_loader_never_crashes_and_round_trips(fuzz_dir, data):
    _load_roundtrip(fuzz_dir, data, load_recipe)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.one_of(mapping(Suite), mapping(Suite, junky=False), valid_suite))
def test_suite_loader_never_crashes_and_round_trips(fuzz_dir, data):
    _load_roundtrip(fuzz_dir, data, load_suite)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_as_recipe_or_suite_is_config_error_or_loads(fuzz_dir, text):
    path = fuzz_dir / f"raw{next(_files)}.yaml"
    path.write_text(text, encoding="utf-8")
    for loader in (load_recipe, load_suite):
        try:
            loader(path)
        except ConfigError as e:
            assert "\n" not in str(e)


# --- grid axis parser ----------------------------------------------------------------------------

NUM = st.one_of(st.integers(-(10**30), 10**30).map(str), st.floats().map(repr), st.sampled_from(["", ".", "-", "1e5", "nan", "inf", "-inf", "1e400", "9" * 400]))
ITEM = st.one_of(NUM, st.builds(lambda a, b: f"{a}-{b}", NUM, NUM),
                 st.builds(lambda a, b, s: f"{a}-{b} (+{s})", NUM, NUM, NUM),
                 st.builds(lambda a, b, s: f"{a}-{b} [{s}]", NUM, NUM, NUM), st.text(max_size=8))
NAMES = st.one_of(st.sampled_from(sorted(AXES) + ["guidance", "sampler", "seeds"]), st.text(max_size=6))


@settings(max_examples=300, deadline=None)
@given(spec=st.one_of(st.text(max_size=40),
                      st.builds(lambda n, items: f"{n}=" + ",".join(items), NAMES, st.lists(ITEM, max_size=4)),
                      st.builds(lambda n, v: f"{n}=" + yaml.safe_dump(v, default_flow_style=True).strip(),
                                NAMES, st.lists(junk, max_size=3))))
def test_axis_parser_never_raises_anything_but_config_error(spec):
    try:
        axis = parse_axis(spec)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert len(axis.values) == len(axis.labels) >= 1
    assert all(math.isfinite(v) for v in axis.values if isinstance(v, float))


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 5000), b=st.integers(0, 5000), step=st.integers(1, 60), extra=st.lists(st.integers(0, 99)))
def test_int_ranges_expand_exactly_and_round_trip(a, b, step, extra):
    lo, hi = min(a, b), max(a, b)
    axis = parse_axis(f"seed={lo}-{hi} (+{step})" + "".join(f", {x}" for x in extra))
    assert list(axis.values) == list(range(lo, hi + 1, step)) + extra
    down = parse_axis(f"seed={hi}-{lo} (-{step})")
    assert list(down.values) == list(range(hi, lo - 1, -step))
    again = parse_axis("seed=" + ",".join(axis.labels))
    assert again.values == axis.values


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["cfg", "lora_scale"]),
       values=st.lists(st.floats(0, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=5))
def test_float_values_formatted_back_reparse_to_the_same_list(name, values):
    axis = parse_axis(f"{name}=" + ",".join(repr(v) for v in values))
    assert list(axis.values) == values
    assert parse_axis(f"{name}=" + ",".join(repr(v) for v in axis.values)).values == axis.values


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["prompt", "negative", "checkpoint"]),
       values=st.lists(st.text(min_size=1, max_size=15).filter(lambda s: s.strip() == s and s.isprintable()),
                       min_size=1, max_size=4))
def test_string_values_as_yaml_list_round_trip(name, values):
    spec = f"{name}=" + yaml.safe_dump(values, default_flow_style=True, width=10**6).strip()
    axis = parse_axis(spec)
    assert list(axis.values) == values
    again = parse_axis(f"{name}=" + yaml.safe_dump(list(axis.values), default_flow_style=True, width=10**6).strip())
    assert again.values == axis.values
