"""Faults injected into the engine's file layer (a seam in csrc/engine/file_io.cc,
not a fake filesystem): each failure is reported with the path, leaves the
destination untouched and the engine usable; recoverable ones are recovered."""

import errno

import pytest
import torch

import ckptio
from ckptio._testing import inject_fault
from ckptio.background import reset
from conftest import leftover_temporaries


def _state(step, n=2 << 20):
    return {"w": torch.full((n,), float(step)), "b": torch.arange(5000) + step, "step": step}


@pytest.fixture
def previous(tmp_path):
    path = tmp_path / "ckpt.pt"
    ckptio.save(_state(1), path)
    return path, path.read_bytes()


def _assert_untouched(path, before):
    assert path.read_bytes() == before
    assert leftover_temporaries(path.parent) == []
    ckptio.save(_state(3), path)  # the engine is still usable
    assert ckptio.load(path)["step"] == 3


@pytest.mark.parametrize("code,at_byte", [(errno.EIO, 1 << 20), (errno.ENOSPC, 0), (errno.EIO, 8 << 20)])
def test_write_error_at_a_byte(previous, code, at_byte):
    path, before = previous
    with inject_fault("write_error_at_byte", errno=code, at_byte=at_byte):
        with pytest.raises(ckptio.CheckpointIOError) as info:
            ckptio.save(_state(2), path)
    assert info.value.errno == code and info.value.filename == str(path)
    _assert_untouched(path, before)


def test_failing_fsync(previous):
    path, before = previous
    with inject_fault("fsync_error", errno=errno.EIO):
        with pytest.raises(ckptio.CheckpointIOError, match="fdatasync") as info:
            ckptio.save(_state(2), path)
    assert info.value.errno == errno.EIO and info.value.filename == str(path)
    _assert_untouched(path, before)


@pytest.mark.parametrize("direct", ["auto", "0"])
@pytest.mark.parametrize("max_chunk", [4096, 100_000, 1000])
def test_short_writes_are_completed(tmp_path, monkeypatch, fresh_engine, direct, max_chunk):
    monkeypatch.setenv("CKPTIO_DIRECT_IO", direct)
    with inject_fault("short_writes", max_chunk=max_chunk):
        ckptio.save(_state(2), tmp_path / "c.pt")
    ckptio.verify(tmp_path / "c.pt")
    out = torch.load(tmp_path / "c.pt", weights_only=True)
    assert out["step"] == 2 and torch.equal(out["b"], torch.arange(5000) + 2)


def test_eintr_storm_is_retried(tmp_path):
    with inject_fault("eintr_storm", count=5000):
        ckptio.save(_state(2), tmp_path / "c.pt")
    assert ckptio.load(tmp_path / "c.pt")["step"] == 2


def test_fault_in_a_background_save_surfaces_on_the_next_call(previous):
    reset()
    path, before = previous
    with inject_fault("write_error_at_byte", errno=errno.EIO, at_byte=4096):
        handle = ckptio.async_save(_state(2), path)
        handle._done.wait(60)
    with pytest.raises(ckptio.CheckpointIOError) as info:
        ckptio.wait()
    assert info.value.errno == errno.EIO and info.value.filename == str(path)
    _assert_untouched(path, before)
