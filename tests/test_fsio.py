import os
import stat

import pytest

from hammer.fsio import atomic_directory, atomic_file, atomic_path


def test_atomic_directory_appears_only_on_success_with_ordinary_permissions(tmp_path):
    dst = tmp_path / "out"
    with atomic_directory(dst) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not dst.exists()
    assert (dst / "a.txt").read_text() == "x"
    assert stat.S_IMODE(dst.stat().st_mode) == 0o777 & ~_umask()


def test_atomic_directory_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_directory_refuses_an_existing_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(tmp_path / "out"):
            pass
    assert (tmp_path / "out" / "mine.txt").read_text() == "user data"


def test_atomic_file_replaces_only_on_success(tmp_path):
    dst = tmp_path / "index.json"
    dst.write_text("old")
    with pytest.raises(OSError):
        with atomic_file(dst) as f:
            f.write("half")
            raise OSError(28, "No space left on device")
    assert dst.read_text() == "old" and os.listdir(tmp_path) == ["index.json"]
    with atomic_file(dst) as f:
        f.write("new")
    assert dst.read_text() == "new"
    assert stat.S_IMODE(dst.stat().st_mode) == 0o666 & ~_umask()


def test_atomic_path_appears_only_on_success_and_never_replaces_a_file(tmp_path):
    dst = tmp_path / "sub" / "model.gguf"
    with pytest.raises(OSError):
        with atomic_path(dst) as tmp:
            tmp.write_bytes(b"half")  # a writer that opens the path itself
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path / "sub") == []
    with atomic_path(dst) as tmp:
        tmp.write_bytes(b"whole")
        assert not dst.exists()
    assert dst.read_bytes() == b"whole"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_path(dst):
            pass
    assert dst.read_bytes() == b"whole" and os.listdir(tmp_path / "sub") == ["model.gguf"]


def test_atomic_outputs_create_missing_parent_directories(tmp_path):
    with atomic_file(tmp_path / "new" / "index.json") as f:
        f.write("x")
    with atomic_directory(tmp_path / "other" / "out") as tmp:
        (tmp / "a.txt").write_text("y")
    assert (tmp_path / "new" / "index.json").read_text() == "x"
    assert (tmp_path / "other" / "out" / "a.txt").read_text() == "y"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
