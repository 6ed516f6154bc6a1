import os

import pytest

from harness.errors import HarnessError
from harness.io import append_jsonl, atomic_dir, atomic_write_text, read_jsonl


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "good")

    def boom(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    from harness.io import atomic_write

    with pytest.raises(HarnessError, match=r"f.txt: cannot write \(No space left on device\)"):
        atomic_write(p, boom)
    assert p.read_text() == "good"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_no_overwrite(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "a")
    with pytest.raises(HarnessError, match="refusing to overwrite"):
        atomic_write_text(p, "b", overwrite=False)
    assert p.read_text() == "a"
    assert oct(os.stat(p).st_mode & 0o777) != oct(0o600)


def test_read_only_dir(tmp_path):
    if os.geteuid() == 0:
        # root ignores permissions; simulate with a path under a file instead
        target = tmp_path / "file" / "x.txt"
        (tmp_path / "file").write_text("")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "x.txt"
    with pytest.raises(HarnessError, match="x.txt"):
        atomic_write_text(target, "data")


def test_atomic_dir_is_all_or_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "ck") as d:
            (d / "a").write_text("1")
            raise RuntimeError("killed")
    assert not (tmp_path / "ck").exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "ck") as d:
        (d / "a").write_text("1")
    assert (tmp_path / "ck" / "a").read_text() == "1"


def test_jsonl_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    append_jsonl(p, {"a": 1})
    append_jsonl(p, {"a": 2})
    with open(p, "a") as f:
        f.write('{"a": 3')  # killed mid-write
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
