"""The project's shape: stages import only earlier stages; shipped tokenizer matches open_clip's BPE."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "harness"
# Data flows one way; the judges (estimator, metrics) sit before train because it scores its samples.
# eval turns a suite + checkpoints into results.json, report renders run folders, world (the digits
# world and `harness demo`) may use everything.
ORDER = ["models", "data", "caption", "estimator", "metrics", "train", "generate", "eval", "report", "world"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("stage", ORDER)
def test_stage_imports_only_earlier_stages(stage):
    allowed = set(ORDER[: ORDER.index(stage) + 1])
    bad = []
    for f in (PKG / stage).rglob("*.py"):
        for mod in _imports(f):
            parts = mod.split(".")
            if parts[0] == "harness" and len(parts) > 1 and parts[1] in ORDER and parts[1] not in allowed:
                bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not bad, "later-stage imports: " + "; ".join(bad)


def test_only_stage_folders_in_package():
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert folders <= set(ORDER), f"unexpected folders in harness/: {sorted(folders - set(ORDER))}"


MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
# Exceptions to the ceilings, each with its reason. Keep this list short: split by concern instead.
FILE_ALLOW: dict[str, str] = {}
FUNCTION_ALLOW: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _module_deps(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Harness modules ``name`` imports, at any depth of the file (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    # a package's __init__ runs before its modules, so importing a parent package is not a cycle edge
    return {d for d in found if d in modules and d != name and not name.startswith(d + ".")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {m: _module_deps(m, f, modules) for m, f in modules.items()}
    assert not _cycles(graph), f"modules that import each other: {_cycles(graph)}"


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_files_stay_under_the_line_ceiling():
    long = {str(f.relative_to(ROOT)): n for f in PKG.rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    over = {k: v for k, v in long.items() if k not in FILE_ALLOW}
    assert not over, f"files over {MAX_FILE_LINES} lines (split by concern): {over}"
    assert set(FILE_ALLOW) <= set(long), f"allow-list names files now under the ceiling: {set(FILE_ALLOW) - set(long)}"


def _long_functions(path: Path) -> dict[str, int]:
    out = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                out[f"{path.relative_to(ROOT)}::{node.name}"] = n
    return out


def test_functions_stay_under_the_line_ceiling():
    long = {k: v for f in PKG.rglob("*.py") for k, v in _long_functions(f).items()}
    over = {k: v for k, v in long.items() if k not in FUNCTION_ALLOW}
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines (split where a name explains the part): {over}"
    assert set(FUNCTION_ALLOW) <= set(long), f"allow-list names functions now short: {set(FUNCTION_ALLOW) - set(long)}"


def test_report_only_reads_run_folders():
    """The report renders what eval wrote (its layout, verdicts, gates); only ``evaluate.py``, which
    runs a suite and then renders it, may start a run."""
    modules = _modules()
    runs_models = ("models", "data", "caption", "train", "generate", "estimator", "metrics")
    reads = {"harness.eval", "harness.eval.layout", "harness.eval.verdict", "harness.eval.gates", "harness.eval.suite"}
    bad = []
    for f in (PKG / "report").rglob("*.py"):
        if f.name == "evaluate.py":
            continue
        for mod in _module_deps("harness.report." + f.stem, f, modules):
            parts = mod.split(".")
            if parts[1] in runs_models or (parts[1] == "eval" and mod not in reads):
                bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not bad, "the report stage runs models: " + "; ".join(bad)


def test_shipped_tokenizer_matches_open_clip_bpe():
    from harness.models.tokenizer import PACKAGED_DIR, vocab_and_merges

    vocab, merges = vocab_and_merges()
    assert json.loads((PACKAGED_DIR / "vocab.json").read_text()) == vocab
    assert (PACKAGED_DIR / "merges.txt").read_text().splitlines()[1:] == merges
    assert len(vocab) == 49408


def test_tokenizer_ids_match_open_clip():
    import open_clip

    from harness.models.tokenizer import clip_tokenizer

    text = "a handwritten digit seven, red ink on cream paper!"
    ours = clip_tokenizer()(text)["input_ids"]
    theirs = open_clip.get_tokenizer("ViT-B-32")([text])[0].tolist()
    assert theirs[: len(ours)] == ours
