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
