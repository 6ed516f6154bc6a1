"""Captioning stage: the tiny BLIP from the zoo (gibberish captions, real plumbing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _data_helpers import PHOTOS, photo, write_photos

from harness.caption import blip as blip_mod
from harness.caption.blip import JOURNAL_NAME, caption_folder, count_words, load_captioner
from harness.cli import main
from harness.data.folder import scan_dataset
from harness.errors import CheckpointError, HarnessError
from harness.models.tiny import build_tiny_blip


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Generation is many tiny ops; on 2 shared cores extra threads only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def blip(zoo_dir):
    return load_captioner(zoo_dir / "blip", device="cpu")


def _count_calls(model, monkeypatch, *, fail_on=None, exc=KeyboardInterrupt):
    """Record generate() kwargs; raise ``exc`` on call number ``fail_on`` (1-based) to simulate a kill."""
    calls, real = [], model.generate

    def spy(**kw):
        calls.append(kw)
        if fail_on is not None and len(calls) == fail_on:
            raise exc("simulated kill")
        return real(**kw)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def _snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.glob("*.txt"))}


def test_captions_written_existing_kept_bad_files_counted(blip, tmp_path):
    model, proc = blip
    write_photos(tmp_path, PHOTOS)
    (tmp_path / "rocket.txt").write_bytes(b"my own caption \xe2\x9c\x93")
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "notimage.jpg").write_text("not a jpeg")
    photo("coffee").save(tmp_path / "latin1.png")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    before = _snapshot(tmp_path)
    s = caption_folder(tmp_path, model=model, processor=proc, batch_size=2, suffix=", unsplash photography")
    assert sorted(p.name for p, _ in s.captioned) == ["astronaut.png", "chelsea.png", "coffee.png"]
    assert [p.name for p, _ in s.skipped] == ["rocket.png"]
    failed = {p.name: why for p, why in s.failed}
    assert set(failed) == {"zero.png", "notimage.jpg", "latin1.png"}
    assert "empty file" in failed["zero.png"] and "not UTF-8" in failed["latin1.png"]
    for name in ("rocket.txt", "latin1.txt"):  # no existing caption is lost, even an unreadable one
        assert (tmp_path / name).read_bytes() == before[name][0]
    for path, text in s.captioned:
        assert path.with_suffix(".txt").read_text() == text
        assert text.endswith(", unsplash photography") and count_words(text) > 2
    assert "captioned 3, skipped 1" in s.format() and "zero.png: empty file" in s.format()


def test_no_overwrite_unless_asked_and_dry_run_writes_nothing(blip, tmp_path):
    model, proc = blip
    write_photos(tmp_path, ["astronaut", "chelsea"])
    (tmp_path / "astronaut.txt").write_text("")  # even an empty caption file is the user's
    s = caption_folder(tmp_path, model=model, processor=proc, dry_run=True)
    assert [p.name for p, _ in s.captioned] == ["chelsea.png"] and not (tmp_path / "chelsea.txt").exists()
    caption_folder(tmp_path, model=model, processor=proc)
    assert (tmp_path / "astronaut.txt").read_text() == ""
    s = caption_folder(tmp_path, model=model, processor=proc, overwrite=True, prefix="photo: ")
    assert len(s.captioned) == 2 and (tmp_path / "astronaut.txt").read_text().startswith("photo: ")


def test_cli_loads_local_model_and_dry_run_prints(zoo_dir, tmp_path, capsys):
    write_photos(tmp_path, ["coffee"])
    rc = main(["caption", str(tmp_path), "--model", str(zoo_dir / "blip"), "--dry-run", "--suffix", ", unsplash"])
    out = capsys.readouterr().out
    assert rc == 0 and "coffee.png\t" in out and ", unsplash\n" in out and "would caption 1" in out
    assert not (tmp_path / "coffee.txt").exists()
    assert main(["caption", str(tmp_path), "--model", str(tmp_path / "nope")]) == 2
    assert "no such local folder" in capsys.readouterr().err


def test_min_words_extends_a_model_that_stops_at_once(tmp_path, monkeypatch):
    model, proc = build_tiny_blip(seed=1)
    with torch.no_grad():  # make end-of-text the first choice: a random BLIP's usual failure
        model.text_decoder.cls.predictions.bias[proc.tokenizer.sep_token_id] = 100.0
    write_photos(tmp_path, ["astronaut", "chelsea", "rocket"])
    s = caption_folder(tmp_path, model=model, processor=proc, max_retries=0, dry_run=True)
    assert len(s.failed) == 3 and all("empty caption" in why for _, why in s.failed)
    calls = _count_calls(model, monkeypatch)
    s = caption_folder(tmp_path, model=model, processor=proc, min_words=6, batch_size=3)
    assert len(s.captioned) == 3 and not s.short
    assert all(count_words(p.with_suffix(".txt").read_text()) >= 6 for p, _ in s.captioned)
    assert len(calls) >= 2 and calls[-1]["min_new_tokens"] >= 6


def test_prompt_max_words_and_sampling_knobs_reach_generate(blip, tmp_path, monkeypatch):
    model, proc = blip
    write_photos(tmp_path, ["astronaut", "coffee"])
    calls = _count_calls(model, monkeypatch)
    s = caption_folder(tmp_path, model=model, processor=proc, prompt="a photo of", max_words=5, do_sample=True,
                       num_beams=1, top_p=0.8, temperature=0.7, repetition_penalty=1.4, max_new_tokens=12, seed=3)
    kw = calls[0]
    assert kw["do_sample"] and kw["top_p"] == 0.8 and kw["temperature"] == 0.7
    assert kw["repetition_penalty"] == 1.4 and kw["num_beams"] == 1 and kw["max_new_tokens"] == 12
    assert "input_ids" in kw  # the conditional prompt is fed to the decoder
    for _, text in s.captioned:
        assert text.startswith("a photo of") and len(text.split()) <= 5


def test_kill_mid_run_resume_captions_only_the_rest(blip, tmp_path, monkeypatch):
    model, proc = blip
    write_photos(tmp_path, PHOTOS)
    write_photos(tmp_path / "more", ["astronaut", "coffee"])
    _count_calls(model, monkeypatch, fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        caption_folder(tmp_path, model=model, processor=proc, batch_size=2, max_retries=0)
    done = _snapshot(tmp_path) | {f"more/{k}": v for k, v in _snapshot(tmp_path / "more").items()}
    assert len(done) == 4
    monkeypatch.undo()
    calls = _count_calls(model, monkeypatch)
    s = caption_folder(tmp_path, model=model, processor=proc, batch_size=2, max_retries=0)
    assert len(s.captioned) == 2 and len(s.skipped) == 4 and len(calls) == 1
    after = _snapshot(tmp_path) | {f"more/{k}": v for k, v in _snapshot(tmp_path / "more").items()}
    assert all(after[k] == v for k, v in done.items())  # byte-identical and untouched (same mtime)
    assert len(after) == 6


def test_jsonl_output_survives_a_kill_before_merge(blip, tmp_path, monkeypatch):
    model, proc = blip
    write_photos(tmp_path, PHOTOS)
    meta = [json.dumps({"file_name": "rocket.png", "text": "user caption", "credit": "x"}),
            json.dumps({"file_name": "chelsea.png", "split": "val"}), "{broken line"]
    (tmp_path / "metadata.jsonl").write_text("\n".join(meta) + "\n")
    _count_calls(model, monkeypatch, fail_on=2)
    monkeypatch.setattr(blip_mod, "_journal_merge", lambda root, dry_run=False: 0)  # killed before merging
    with pytest.raises(KeyboardInterrupt):
        caption_folder(tmp_path, model=model, processor=proc, batch_size=2, output="jsonl", max_retries=0)
    journal = tmp_path / JOURNAL_NAME
    first = [json.loads(x) for x in journal.read_text().splitlines()]
    assert len(first) == 2
    with open(journal, "a") as f:
        f.write('{"file_name": "coffee.png", "te')  # torn last line from the kill
    monkeypatch.undo()
    s = caption_folder(tmp_path, model=model, processor=proc, batch_size=2, output="jsonl", max_retries=0)
    assert not journal.exists() and len(s.captioned) == 1 and len(s.skipped) == 3
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    assert lines[0] == meta[0] and "{broken line" in lines
    rows = [json.loads(x) for x in lines if x != "{broken line"]
    names = [r["file_name"] for r in rows]
    assert sorted(names) == sorted(f"{n}.png" for n in PHOTOS)  # one row each, no duplicates
    by = {r["file_name"]: r for r in rows}
    assert by["chelsea.png"]["split"] == "val" and by["chelsea.png"]["text"]
    assert all(by[r["file_name"]]["text"] == r["text"] for r in first)
    assert {it.rel: it.caption for it in scan_dataset(tmp_path).items}["rocket.png"] == "user caption"


def test_one_bad_batch_or_image_never_stops_the_run(blip, tmp_path, monkeypatch):
    model, proc = blip
    write_photos(tmp_path, ["astronaut", "chelsea", "coffee"])
    real = model.generate

    def flaky(**kw):
        if kw["pixel_values"].shape[0] > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        if float(kw["pixel_values"].mean()) == ref_mean:
            raise RuntimeError("bad image (simulated)")
        return real(**kw)

    ref_mean = float(proc(images=[photo("chelsea")], return_tensors="pt")["pixel_values"].mean())
    monkeypatch.setattr(model, "generate", flaky)
    s = caption_folder(tmp_path, model=model, processor=proc, batch_size=3, max_retries=0)
    assert sorted(p.name for p, _ in s.captioned) == ["astronaut.png", "coffee.png"]
    assert [(p.name, "simulated" in why) for p, why in s.failed] == [("chelsea.png", True)]


@pytest.mark.parametrize("kwargs,match", [({"batch_size": 0}, "batch_size: expected >= 1, got 0"),
                                          ({"output": "csv"}, "output: expected one of txt, jsonl, got 'csv'"),
                                          ({"top_p": 0}, r"top_p: expected in \(0, 1\], got 0"),
                                          ({"min_words": 5, "max_words": 3}, "max_words: expected >= min_words")])
def test_bad_arguments_name_the_argument(blip, tmp_path, kwargs, match):
    with pytest.raises(HarnessError, match=match):
        caption_folder(tmp_path, model=blip[0], processor=blip[1], **kwargs)


def test_load_captioner_errors(zoo_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no such local folder, and not a hub id"):
        load_captioner("./missing-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="expected a model folder with config.json"):
        load_captioner(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="cannot load a BLIP config"):
        load_captioner(zoo_dir / "sd" / "unet")
    with pytest.raises(CheckpointError, match="Salesforce/blip-image-captioning-large: cannot load"):
        load_captioner("Salesforce/blip-image-captioning-large")  # offline: a clear error, no traceback
    with pytest.raises(CheckpointError, match="blip2 requested but the checkpoint is model_type 'blip'"):
        load_captioner(zoo_dir / "blip", blip2=True)
    with pytest.raises(HarnessError, match="processor: required"):
        load_captioner(build_tiny_blip()[0])


def _save_tiny_blip2(out):
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
    )

    from harness.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    torch.manual_seed(0)
    text = OPTConfig(vocab_size=len(tok) + 1, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                     word_embed_proj_dim=32, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 4, "encoder_hidden_size": 32, "vocab_size": 100},
        text_config=text.to_dict(), num_query_tokens=4, image_token_index=len(tok))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.image_token = "<image>"
    proc = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                          num_query_tokens=4)
    Blip2ForConditionalGeneration(cfg).save_pretrained(out)
    proc.save_pretrained(out)


def test_blip2_option_captions(tmp_path):
    _save_tiny_blip2(tmp_path / "blip2")
    write_photos(tmp_path / "ds", ["astronaut", "rocket"])
    s = caption_folder(tmp_path / "ds", model=tmp_path / "blip2", blip2=True, min_words=3, num_beams=1,
                       device="cpu", progress=False)
    assert len(s.captioned) == 2 and all(count_words(t) >= 3 for _, t in s.captioned)
    assert (tmp_path / "ds" / "rocket.txt").read_text() == dict((p.name, t) for p, t in s.captioned)["rocket.png"]


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_with_only_the_rest(zoo_dir, tmp_path):
    names = [f"img{i:02d}" for i in range(16)]
    for i, name in enumerate(names):
        photo(PHOTOS[i % 4], (40 + i, 32)).save(tmp_path / f"{name}.png")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "harness", "-q", "caption", str(tmp_path), "--model", str(zoo_dir / "blip"),
           "--batch-size", "1", "--beams", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("*.txt"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # it was killed mid-run, not finished
    done = _snapshot(tmp_path)
    assert len(done) >= 3 and all(v[0] for v in done.values())  # no empty or torn caption files
    model, processor = load_captioner(zoo_dir / "blip", device="cpu")
    s = caption_folder(tmp_path, model=model, processor=processor, num_beams=1, progress=False)
    assert len(s.captioned) == len(names) - len(done) and len(s.skipped) == len(done)
    after = _snapshot(tmp_path)
    assert len(after) == len(names) and all(after[k] == v for k, v in done.items())


def test_caption_hostile_folder_only_good_images_nothing_written_outside(blip, tmp_path):
    from _data_helpers import write_hostile

    root, outside = tmp_path / "ds", tmp_path / "outside"
    expected = write_hostile(root, outside)
    write_photos(root, ["chelsea"])
    before_outside = sorted(p.name for p in outside.iterdir())
    before = {p.name: p.read_bytes() for p in root.glob("*.txt")}
    s = caption_folder(root, model=blip[0], processor=blip[1], output="txt", max_retries=0)
    assert [p.name for p, _ in s.captioned] == ["chelsea.png"]
    assert len(s.failed) == len(expected)
    assert sorted(p.name for p in outside.iterdir()) == before_outside
    assert all((root / name).read_bytes() == data for name, data in before.items())
    assert not (root / "metadata.jsonl.tmp").exists() and not (root / "escape.txt").exists()


def test_summary_counts_distinct_captions_and_warns_when_few(tmp_path):
    from harness.caption.blip import CaptionSummary

    s = CaptionSummary(root=tmp_path, captioned=[(tmp_path / f"{i}.png", "a cat" if i % 10 else "a dog")
                                                 for i in range(20)])
    assert s.distinct == 2 and s.counts()["distinct"] == 2
    assert "2 distinct caption(s)" in s.format() and "only 2 distinct captions for 20 images" in s.format()
