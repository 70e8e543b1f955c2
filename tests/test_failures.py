"""A save that cannot complete raises a clear error, keeps the previous
checkpoint byte-identical and leaves no temporary file behind."""

import errno
import os

import pytest
import torch

import ckptio
from conftest import leftover_temporaries


def _state(nbytes):
    return {"w": torch.arange(nbytes // 8, dtype=torch.int64), "step": nbytes}


def test_read_only_directory(tmp_path, make_read_only):
    path = tmp_path / "ckpt.pt"
    ckptio.save(_state(1 << 16), path)
    before = path.read_bytes()
    make_read_only(tmp_path)
    with pytest.raises(ckptio.CheckpointIOError) as info:
        ckptio.save(_state(1 << 20), path)
    assert info.value.filename == str(path)
    assert info.value.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert leftover_temporaries(tmp_path) == []


def test_file_where_directory_should_be(tmp_path):
    (tmp_path / "not_a_dir").write_text("x")
    with pytest.raises(ckptio.CheckpointIOError) as info:
        ckptio.save(_state(1024), tmp_path / "not_a_dir" / "ckpt.pt")
    assert info.value.errno == errno.ENOTDIR
    assert "not_a_dir" in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(ckptio.CheckpointNotFoundError) as info:
        ckptio.save(_state(1024), tmp_path / "nope" / "ckpt.pt")
    assert isinstance(info.value, FileNotFoundError)


def test_saving_over_a_directory(tmp_path):
    (tmp_path / "ckpt.pt").mkdir()
    with pytest.raises(ckptio.CheckpointIOError, match="directory"):
        ckptio.save(_state(1024), tmp_path / "ckpt.pt")


def test_full_disk(small_filesystem):
    path = small_filesystem / "ckpt.pt"
    ckptio.save(_state(1 << 18), path)  # 256 KiB fits in 2 MiB
    before = path.read_bytes()
    with pytest.raises(ckptio.CheckpointIOError) as info:
        ckptio.save(_state(8 << 20), path)  # 8 MiB does not
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(path)
    assert path.read_bytes() == before
    assert leftover_temporaries(small_filesystem) == []
    # The engine is still usable, and space came back.
    ckptio.save(_state(1 << 18), path)
    torch.testing.assert_close(ckptio.load(path)["w"], _state(1 << 18)["w"])


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / ".ckptio-tmp-999999999-0"  # no such pid
    dead.write_bytes(b"half a checkpoint")
    dead_legacy = tmp_path / ".ckpt.pt.ckptio-tmp-999999999-1"  # an earlier release's name
    dead_legacy.write_bytes(b"half a checkpoint")
    mine = tmp_path / f".ckpt.pt.ckptio-tmp-{os.getpid()}-12345"  # a live writer's
    mine.write_bytes(b"in progress")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    ckptio.save(_state(1024), tmp_path / "ckpt.pt")
    assert not dead.exists() and not dead_legacy.exists()
    assert mine.exists() and unrelated.exists()


def test_engine_usable_after_failures(tmp_path):
    for _ in range(3):
        with pytest.raises(ckptio.CheckpointIOError):
            ckptio.save(_state(1024), tmp_path / "missing" / "x.pt")
    ckptio.save(_state(1024), tmp_path / "ok.pt")
    assert ckptio.load(tmp_path / "ok.pt")["step"] == 1024


@pytest.mark.parametrize("plugin", [ckptio.FastCheckpointIO, ckptio.TorchCheckpointIO])
def test_unpicklable_object_raises_and_leaves_the_previous_file(tmp_path, plugin):
    path = tmp_path / "ckpt.pt"
    io = plugin()
    io.save_checkpoint(_state(1024), str(path))
    before = path.read_bytes()
    with pytest.raises(Exception) as info:
        io.save_checkpoint({"fn": lambda: 1, "w": torch.ones(3)}, str(path))
    assert "pickle" in str(info.value).lower() or "lambda" in str(info.value).lower()
    assert path.read_bytes() == before
    assert leftover_temporaries(tmp_path) == []
