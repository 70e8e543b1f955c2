"""Tuning variables: each changes what the engine does, and a bad value
raises an error that names the variable."""

import os
import subprocess
import sys
import zipfile

import pytest
import torch

import ckptio
from ckptio import engine_info


def _state():
    return {"w": torch.randn(1 << 20)}


@pytest.mark.parametrize(
    "var,value",
    [
        ("CKPTIO_NUM_THREADS", "0"),
        ("CKPTIO_NUM_THREADS", "many"),
        ("CKPTIO_BLOCK_MB", "0"),
        ("CKPTIO_BLOCK_MB", "4096"),
        ("CKPTIO_QUEUE_DEPTH", "-1"),
        ("CKPTIO_DIRECT_IO", "maybe"),
        ("CKPTIO_VERIFY", "2"),
        ("CKPTIO_READ_ZERO_COPY", "yes please"),
    ],
)
def test_bad_value_names_the_variable(tmp_path, monkeypatch, fresh_engine, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ckptio.ConfigError, match=var) as info:
        ckptio.save(_state(), tmp_path / "c.pt")
        ckptio.load(tmp_path / "c.pt")
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "c.pt").exists() or var == "CKPTIO_VERIFY"


def test_engine_takes_its_options_from_the_environment(monkeypatch, fresh_engine):
    monkeypatch.setenv("CKPTIO_NUM_THREADS", "3")
    monkeypatch.setenv("CKPTIO_BLOCK_MB", "2")
    monkeypatch.setenv("CKPTIO_QUEUE_DEPTH", "5")
    monkeypatch.setenv("CKPTIO_DIRECT_IO", "0")
    monkeypatch.setenv("CKPTIO_READ_ZERO_COPY", "1")
    assert engine_info() == {"num_threads": 3, "block_bytes": 2 << 20, "queue_depth": 5, "direct_io": "0",
                             "zero_copy_reads": True}


def test_num_threads_sets_the_worker_count(tmp_path):
    code = (
        "import os, torch, ckptio;"
        f"ckptio.save({{'w': torch.ones(10)}}, {str(tmp_path / 'c.pt')!r});"
        "print(len(os.listdir('/proc/self/task')))"
    )
    counts = {}
    for n, depth in ((1, 1), (6, 1), (1, 4)):
        env = dict(os.environ, CKPTIO_NUM_THREADS=str(n), CKPTIO_QUEUE_DEPTH=str(depth), OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        counts[n, depth] = int(out.stdout.strip())
    # Per engine thread: one I/O worker and one snapshot-copy worker (the
    # caller is the copy pool's last thread, so one thread means none). The
    # I/O pool never has fewer than queue_depth + 1 workers (requests in
    # flight block in the kernel, plus the read prefaulter).
    assert counts[6, 1] - counts[1, 1] == (6 - 2) + 5
    assert counts[1, 4] - counts[1, 1] == 5 - 2


def test_direct_io_off_uses_buffered_writes(tmp_path, monkeypatch, fresh_engine):
    monkeypatch.setenv("CKPTIO_DIRECT_IO", "0")
    assert ckptio.save(_state(), tmp_path / "c.pt").direct_io is False
    assert zipfile.ZipFile(tmp_path / "c.pt").testzip() is None


def test_direct_io_auto_uses_o_direct_where_possible(tmp_path, fresh_engine):
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    if fs not in ("ext2/ext3", "ext4", "xfs", "btrfs"):
        pytest.skip(f"O_DIRECT support on {fs!r} is not known")
    assert ckptio.save(_state(), tmp_path / "c.pt").direct_io is True


def test_direct_io_required_fails_clearly_where_refused(no_direct_io_filesystem, monkeypatch, fresh_engine):
    monkeypatch.setenv("CKPTIO_DIRECT_IO", "1")
    path = no_direct_io_filesystem / "c.pt"
    with pytest.raises(ckptio.CheckpointIOError, match="CKPTIO_DIRECT_IO") as info:
        ckptio.save(_state(), path)
    assert info.value.filename == str(path)
    assert os.listdir(no_direct_io_filesystem) == []


def test_falls_back_to_buffered_where_o_direct_is_refused(no_direct_io_filesystem, fresh_engine):
    path = no_direct_io_filesystem / "c.pt"
    result = ckptio.save(_state(), path)
    assert result.direct_io is False
    assert ckptio.verify(path).records > 0
    assert torch.equal(ckptio.load(path)["w"], torch.load(path, weights_only=True)["w"])


@pytest.mark.parametrize("block_mb", ["1", "3"])
def test_block_size_does_not_change_the_file(tmp_path, monkeypatch, fresh_engine, block_mb):
    state = {"a": torch.randn(3 << 20), "b": torch.randn(100), "c": torch.randn(1 << 20)}
    monkeypatch.setenv("CKPTIO_BLOCK_MB", block_mb)
    ckptio.save(state, tmp_path / "c.pt")
    assert zipfile.ZipFile(tmp_path / "c.pt").testzip() is None
    out = ckptio.load(tmp_path / "c.pt")
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_verify_variable_turns_off_checking(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckptio.save({"w": torch.zeros(4096)}, path)
    data = bytearray(path.read_bytes())
    pos = data.find(b"\0" * 8192)  # inside the payload of zeros
    data[pos + 100] = 1
    path.write_bytes(bytes(data))
    with pytest.raises(ckptio.CorruptCheckpointError):
        ckptio.load(path)
    monkeypatch.setenv("CKPTIO_VERIFY", "0")
    assert ckptio.load(path)["w"].count_nonzero() == 1
