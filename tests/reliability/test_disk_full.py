"""Disk full / read-only output, simulated by making the write syscalls fail with ENOSPC (or EROFS)
for one target path: every stage stops with one line naming the path, and the previous good files
are intact (no torn file, no stray temporary file, no lost previous version)."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import torch
from _rel_helpers import REPO, snapshot

from harness.caption.blip import caption_folder, load_captioner
from harness.cli import main
from harness.errors import HarnessError
from harness.train import checkpoint as ckpt


@pytest.fixture
def fail_writes(monkeypatch):
    """``fail_writes(pattern, how="replace"|"fsync", err=ENOSPC)``: the rename onto (or the fsync of a
    temp file for) any path matching ``pattern`` fails like a full or read-only disk."""

    def install(pattern: str, how: str = "replace", err: int = errno.ENOSPC):
        rx = re.compile(pattern)
        if how == "replace":
            real = os.replace

            def replace(src, dst, *a, **kw):
                if rx.search(os.fspath(dst)):
                    raise OSError(err, os.strerror(err), os.fspath(dst))
                return real(src, dst, *a, **kw)

            monkeypatch.setattr(os, "replace", replace)
        else:
            real_fsync = os.fsync

            def fsync(fd):
                try:
                    target = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
                except OSError:
                    target = ""
                if rx.search(target):
                    raise OSError(err, os.strerror(err))
                return real_fsync(fd)

            monkeypatch.setattr(os, "fsync", fsync)

    return install


def _no_temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith((".tmp-", ".old-"))]


def _one_line(err: str) -> str:
    """The CLI's error line (progress bars may share stderr); exactly one, and no traceback."""
    assert "Traceback" not in err, err
    lines = [m.group(0) for ln in err.splitlines() if (m := re.search(r"harness \w+: error: .*", ln))]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("how", ["replace", "fsync"])
def test_caption_write_fails_keeps_old_caption(zoo_dir, tmp_path, capsys, fail_writes, how):
    from _data_helpers import write_photos

    write_photos(tmp_path, ["astronaut", "coffee"])
    (tmp_path / "astronaut.txt").write_text("the old caption")
    before = snapshot(tmp_path)
    fail_writes(r"astronaut\.txt", how)
    rc = main(["caption", str(tmp_path), "--model", str(zoo_dir / "blip"), "--overwrite", "--beams", "1",
               "--max-new-tokens", "5", "--max-retries", "0", "--batch-size", "1", "--device", "cpu"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "astronaut.txt" in line and "No space left on device" in line
    assert (tmp_path / "astronaut.txt").read_text() == "the old caption"
    assert not _no_temp_files(tmp_path)
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "coffee.txt"} == before


def test_caption_journal_append_fails_with_path(zoo_dir, tmp_path, monkeypatch):
    from _data_helpers import write_photos

    write_photos(tmp_path, ["rocket"])
    real_open = os.open

    def full_open(file, flags, *a, **kw):  # the journal is appended through os.open (O_NOFOLLOW)
        if str(file).endswith(".harness-captions.jsonl") and flags & os.O_APPEND:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, flags, *a, **kw)

    monkeypatch.setattr("os.open", full_open)
    model, processor = load_captioner(zoo_dir / "blip", device="cpu")
    with pytest.raises(HarnessError, match=r"\.harness-captions\.jsonl: cannot append \(No space left on device\)"):
        caption_folder(tmp_path, model=model, processor=processor, output="jsonl", num_beams=1, max_retries=0,
                       max_new_tokens=5, progress=False)
    assert not (tmp_path / "metadata.jsonl").exists()


def _accelerated(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, project_dir=str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return acc, model, opt, sched


def _step(model, opt):
    model(torch.randn(2, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("how, pattern", [("replace", r"step-00000008$"), ("fsync", r"manifest\.json"),
                                          ("replace", r"manifest\.json$")])
def test_checkpoint_write_fails_previous_checkpoint_is_resumed(tmp_path, fail_writes, how, pattern):
    acc, model, opt, sched = _accelerated(tmp_path)
    run = tmp_path / "run"
    _step(model, opt)
    good = ckpt.save_checkpoint(acc, run, {"step": 4}, sched)
    good_files = snapshot(good)
    _step(model, opt)
    fail_writes(pattern, how)
    with pytest.raises(HarnessError) as e:
        ckpt.save_checkpoint(acc, run, {"step": 8}, sched)
    msg = str(e.value)
    assert "\n" not in msg and "step-00000008" in msg and "No space left on device" in msg
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000004"]
    assert ckpt.verify_checkpoint(good) is None and snapshot(good) == good_files
    assert ckpt.find_resume(run, "latest") == good
    assert not _no_temp_files(run)


def test_checkpoint_rewrite_of_same_step_fails_keeps_previous_version(tmp_path, fail_writes):
    """A stage boundary rewrites the checkpoint of the same step (atomic_dir with overwrite): if the
    final rename fails, the earlier complete folder must still be there under its own name."""
    acc, model, opt, sched = _accelerated(tmp_path)
    run = tmp_path / "run"
    _step(model, opt)
    path = ckpt.save_checkpoint(acc, run, {"step": 8, "stage": 0}, sched)
    before = snapshot(path)
    real = os.replace

    def replace(src, dst, *a, **kw):  # moving the old folder aside works; putting the new one in place fails
        if Path(dst) == path and ".tmp-" in os.fspath(src):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
        return real(src, dst, *a, **kw)

    os.replace = replace
    try:
        with pytest.raises(HarnessError, match="step-00000008.*No space left on device"):
            ckpt.save_checkpoint(acc, run, {"step": 8, "stage": 1}, sched)
    finally:
        os.replace = real
    assert path.is_dir(), "the previous checkpoint was moved aside and not put back"
    assert snapshot(path) == before and ckpt.find_resume(run, "latest") == path
    ckpt.clean_stale(run)  # what the next start does: must not delete the only good copy
    assert ckpt.verify_checkpoint(path) is None


@pytest.mark.slow
def test_training_cli_disk_full_at_checkpoint_is_one_line_and_resumable(tiny_sd_dir, tmp_path, capsys, fail_writes):
    from _train_helpers import make_dataset, overrides

    data = make_dataset(tmp_path / "data", n_train=4, n_val=1)
    run = tmp_path / "run"
    args = ["train", str(REPO / "recipes" / "tiny-cpu.yaml"), *overrides(
        tiny_sd_dir, data, run, tmp_path / "cache", **{"train.max_steps": 4, "checkpoint.every_steps": 2,
                                                         "validation.prompts": "[]", "validation.eval_metrics": "[]",
                                                         "validation.every_steps": 0, "train.batch_size": 2})]
    fail_writes(r"step-00000004$")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(args)
    finally:
        torch.set_num_threads(n)
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "step-00000004" in line and "No space left on device" in line, line
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002"]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step-00000002") is None
    assert not (run / "final").exists() and not _no_temp_files(run)


def test_report_write_fails_keeps_previous_report(tmp_path, capsys, fail_writes):
    from _report_helpers import make_fake_run

    run = make_fake_run(tmp_path, hostile_dir=False)
    assert main(["report", str(run)]) == 0
    capsys.readouterr()
    old = (run / "report.html").read_bytes()
    (run / "results.json").write_text((run / "results.json").read_text().replace("a red apple", "a green apple"))
    for how in ("replace", "fsync"):
        fail_writes(r"report\.html", how, errno.EROFS if how == "replace" else errno.ENOSPC)
        rc = main(["report", str(run)])
        line = _one_line(capsys.readouterr().err)
        assert rc == 2 and "report.html" in line and ("Read-only file system" in line or "No space left" in line)
        assert (run / "report.html").read_bytes() == old
        assert not _no_temp_files(run)


def test_feature_cache_write_fails_names_path_and_keeps_other_cache(tmp_path, fail_writes):
    import numpy as np
    from _metrics_helpers import PoolNet
    from PIL import Image

    from harness.metrics.features import ModuleExtractor, file_features, load_features

    files = []
    for i in range(6):
        p = tmp_path / "imgs" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(p)
        files.append(p)
    ext = ModuleExtractor(PoolNet(seed=0), input_size=16)
    cache = tmp_path / "cache"
    first = file_features(files[:3], ext, cache)
    (kept,) = cache.glob("*.npz")
    kept_bytes = kept.read_bytes()
    fail_writes(r"features-.*\.npz$")
    with pytest.raises(HarnessError, match=r"features-[0-9a-f]+\.npz: cannot write \(No space left on device\)"):
        file_features(files[3:], ext, cache)
    assert list(cache.glob("*.npz")) == [kept] and kept.read_bytes() == kept_bytes
    np.testing.assert_array_equal(load_features(kept, ext)["features"], first)
    assert not _no_temp_files(cache)


def test_generated_png_and_latent_cache_writes_fail_with_path(tmp_path, fail_writes):
    from PIL import Image

    from harness.generate.batch import make_params, save_png
    from harness.train.cache import TensorCache

    params = make_params("zoo/sd", "a cat", 0)
    save_png(tmp_path / "img.png", Image.new("RGB", (8, 8)), params)
    old = (tmp_path / "img.png").read_bytes()
    store = TensorCache(tmp_path / "cache", "latents", "ab" * 8)
    store.put("cd" * 32, {"dist": torch.zeros(8)})
    fail_writes(r"img\.png|\.safetensors", "fsync")
    with pytest.raises(HarnessError, match=r"img\.png: cannot write \(No space left on device\)"):
        save_png(tmp_path / "img.png", Image.new("RGB", (8, 8), "red"), params)
    with pytest.raises(HarnessError, match=r"ef+\.safetensors: cannot write"):
        store.put("ef" * 32, {"dist": torch.ones(8)})
    assert (tmp_path / "img.png").read_bytes() == old
    assert store.get("cd" * 32)["dist"].eq(0).all() and store.get("ef" * 32) is None
    assert not _no_temp_files(tmp_path)


def test_append_jsonl_failure_names_path(tmp_path, monkeypatch):
    from harness.io import append_jsonl, read_jsonl

    append_jsonl(tmp_path / "log.jsonl", {"step": 1})
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(HarnessError, match=r"log\.jsonl: cannot append \(No space left on device\)"):
        append_jsonl(tmp_path / "log.jsonl", {"step": 2})
    monkeypatch.setattr(os, "fsync", real)
    assert read_jsonl(tmp_path / "log.jsonl")[0] == {"step": 1}
