"""The CLIP BPE tokenizer SD 1.5 uses, built offline from the BPE merges open_clip ships.

SD 1.5's ``tokenizer/`` folder (vocab.json + merges.txt, 49,408 tokens) is exactly OpenAI CLIP's
tokenizer; open_clip ships the same merges as ``bpe_simple_vocab_16e6.txt.gz``. Rebuilding the two
files from it gives token ids identical to open_clip's tokenizer, with no download.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from harness.io import atomic_write_json, atomic_write_text

N_MERGES = 49152 - 256 - 2  # the vocabulary size (49,408) minus bytes, byte+</w> and two specials
SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
PACKAGED_DIR = Path(__file__).parent / "configs" / "clip-tokenizer"


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable-unicode table, which CLIP's BPE is defined over.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    if bpe_path is None:
        from open_clip.tokenizer import default_bpe

        bpe_path = default_bpe()
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    tokens = list(_bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [SPECIAL["bos_token"], SPECIAL["eos_token"]]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(out_dir: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs transformers' CLIPTokenizer reads."""
    out = Path(out_dir)
    vocab, merges = vocab_and_merges(bpe_path)
    atomic_write_json(out / "vocab.json", vocab, indent=None)
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_json(out / "special_tokens_map.json", SPECIAL)
    atomic_write_json(
        out / "tokenizer_config.json",
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
         "clean_up_tokenization_spaces": True, "errors": "replace", "add_prefix_space": False, **SPECIAL},
    )
    return out


@lru_cache(maxsize=1)
def clip_tokenizer():
    """transformers CLIPTokenizer from the files shipped in the package (no network)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(PACKAGED_DIR))


def save_clip_tokenizer(out_dir: str | Path) -> None:
    clip_tokenizer().save_pretrained(str(out_dir))


def _vocab_size() -> int:
    return len(json.loads((PACKAGED_DIR / "vocab.json").read_text()))
