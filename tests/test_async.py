"""Async saves: snapshot semantics, ordering, errors, exit, streaming, knobs."""

import os
import subprocess
import sys
import textwrap
import zipfile

import psutil
import pytest
import torch

import ckptio
from ckptio import AsyncCheckpointIO, FastCheckpointIO, TorchCheckpointIO
from ckptio.background import get_arena, reset
from ckptio.save_queue import get_queue
from conftest import assert_same, leftover_temporaries, make_everything_state


@pytest.fixture(autouse=True)
def fresh_async_state():
    reset()
    yield
    reset()


def _state(step, n=1 << 18):
    return {
        "w": torch.full((n,), float(step)),
        "b": torch.arange(1000) + step,
        "bf": torch.full((300,), float(step), dtype=torch.bfloat16),
        "step": step,
    }


BACKENDS = {
    "fast": lambda: AsyncCheckpointIO(FastCheckpointIO()),
    "torch": lambda: AsyncCheckpointIO(TorchCheckpointIO()),
    "default": lambda: AsyncCheckpointIO(),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_snapshot_is_taken_before_returning(tmp_path, backend):
    io = BACKENDS[backend]()
    state = make_everything_state()
    expected = make_everything_state()
    io.save_checkpoint(state, tmp_path / "c.pt")
    # Overwrite every tensor in place and drop the references at once.
    for v in list(state.values()) + [state["nested"]["list"][0], state["nested"]["tuple"][0]]:
        if isinstance(v, torch.Tensor) and v.numel():
            v.untyped_storage().fill_(0xAB)
    del state
    io.teardown()
    assert_same(torch.load(tmp_path / "c.pt", weights_only=True), expected)
    assert_same(io.load_checkpoint(tmp_path / "c.pt"), expected)


def test_async_save_function_and_handle(tmp_path):
    h = ckptio.async_save(_state(7), tmp_path / "c.pt")
    assert h.stall_seconds > 0 and h.mode == "staged"
    result = h.result(timeout=60)
    assert h.done() and h.exception() is None
    assert result.bytes == os.path.getsize(tmp_path / "c.pt") and result.write_seconds > 0
    assert h.direct_io is True and h.bytes == result.bytes
    assert ckptio.load(tmp_path / "c.pt")["step"] == 7


def test_fifty_back_to_back_saves_reuse_memory(tmp_path):
    io = AsyncCheckpointIO()
    proc = psutil.Process()
    state_bytes = 32 << 20
    rss = []
    for step in range(50):
        io.save_checkpoint(_state(step, n=state_bytes // 4), tmp_path / f"c{step % 5}.pt")
        if step in (9, 49):
            io.wait()
            rss.append(proc.memory_info().rss)
        if step % 5 == 4:  # every file of a round: complete and of its step
            io.wait()
            for k in range(5):
                out = io.load_checkpoint(tmp_path / f"c{k}.pt")
                assert out["step"] == step - 4 + k and out["w"][0].item() == step - 4 + k
    assert rss[1] - rss[0] < state_bytes // 2, f"resident memory grew by {(rss[1] - rss[0]) >> 20} MiB"
    assert get_arena().num_slots == 2
    assert leftover_temporaries(tmp_path) == []


@pytest.mark.parametrize("backend", ["fast", "torch"])
def test_save_remove_save_keeps_order(tmp_path, backend):
    io = BACKENDS[backend]()
    p, q = tmp_path / "p.pt", tmp_path / "q.pt"
    io.save_checkpoint(_state(1), p)
    io.remove_checkpoint(p)
    io.save_checkpoint(_state(2), q)
    io.teardown()
    assert not p.exists()
    assert io.load_checkpoint(q)["step"] == 2


@pytest.mark.parametrize("backend", ["fast", "torch"])
def test_save_then_load_returns_saved_content(tmp_path, backend):
    io = BACKENDS[backend]()
    io.save_checkpoint(_state(1), tmp_path / "p.pt")
    io.save_checkpoint(_state(2), tmp_path / "p.pt")
    out = io.load_checkpoint(tmp_path / "p.pt")
    assert out["step"] == 2 and torch.equal(out["b"], torch.arange(1000) + 2)


def test_backends_share_one_fifo_queue(tmp_path):
    fast, slow = AsyncCheckpointIO(FastCheckpointIO()), AsyncCheckpointIO(TorchCheckpointIO())
    path = tmp_path / "same.pt"
    for step in range(6):
        (fast if step % 2 else slow).save_checkpoint(_state(step), path)
    fast.teardown()
    assert torch.load(path, weights_only=True)["step"] == 5


@pytest.mark.parametrize("backend", ["fast", "torch"])
def test_background_error_is_raised_once_with_its_type(tmp_path, make_read_only, backend):
    io = BACKENDS[backend]()
    locked = tmp_path / "locked"
    locked.mkdir()
    make_read_only(locked)
    io.save_checkpoint(_state(1), locked / "c.pt")  # fails in the background
    get_queue().wait_all(raise_errors=False)
    with pytest.raises(ckptio.CheckpointIOError) as info:
        io.save_checkpoint(_state(2), tmp_path / "ok.pt")
    assert isinstance(info.value, PermissionError) or info.value.errno in (1, 13, 30)
    assert str(locked / "c.pt") in str(info.value)
    io.save_checkpoint(_state(3), tmp_path / "ok.pt")  # raised once: this one goes through
    io.teardown()
    assert io.load_checkpoint(tmp_path / "ok.pt")["step"] == 3


def test_failure_pending_at_teardown_is_raised_by_teardown(tmp_path, make_read_only):
    io = AsyncCheckpointIO()
    locked = tmp_path / "locked"
    locked.mkdir()
    make_read_only(locked)
    io.save_checkpoint(_state(1), locked / "c.pt")
    with pytest.raises(ckptio.CheckpointIOError):
        io.teardown()
    io.teardown()  # cleared, and the plugin still works after teardown
    io.save_checkpoint(_state(2), tmp_path / "c.pt")
    io.teardown()
    assert io.load_checkpoint(tmp_path / "c.pt")["step"] == 2


def test_error_seen_through_the_handle_is_not_raised_again(tmp_path, make_read_only):
    locked = tmp_path / "locked"
    locked.mkdir()
    make_read_only(locked)
    h = ckptio.async_save(_state(1), locked / "c.pt")
    assert isinstance(h.exception(timeout=60), ckptio.CheckpointIOError)
    ckptio.wait()  # nothing left to raise
    ckptio.save(_state(2), tmp_path / "c.pt")


EXIT_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, ckptio
    def main(path):
        state = {"w": torch.full((8 << 20,), 3.0), "step": 11}  # 32 MiB
        ckptio.async_save(state, path)
        # returns without waiting
    for run in range(int(sys.argv[2])):  # one interpreter per run, forked (torch is imported once)
        pid = os.fork()
        if pid == 0:
            main(os.path.join(sys.argv[1], f"run{run}.pt"))
            sys.exit(0)  # this interpreter's exit, atexit hooks and all, with the save still queued
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    """
)


def test_exit_without_waiting_still_completes_the_save(tmp_path):
    script = tmp_path / "exit_early.py"
    script.write_text(EXIT_SCRIPT)
    (tmp_path / "out").mkdir()
    subprocess.run([sys.executable, str(script), str(tmp_path / "out"), "20"], check=True, timeout=300)
    for run in range(20):
        out = torch.load(tmp_path / "out" / f"run{run}.pt", weights_only=True)
        assert out["step"] == 11 and out["w"].eq(3.0).all()
    assert leftover_temporaries(tmp_path / "out") == []


def _mask_id(path):
    with zipfile.ZipFile(path) as z:
        sid = z.read(f"{path.stem}/.data/serialization_id")
        crc = z.getinfo(f"{path.stem}/.data/serialization_id").CRC.to_bytes(4, "little")
    data = path.read_bytes()
    return data.replace(sid, b"0" * 40).replace(crc, b"\0" * 4)


def test_streaming_mode_writes_the_same_file(tmp_path, monkeypatch):
    state = {f"t{i}": torch.randn(1 << 20) for i in range(6)}  # 24 MiB
    state["small"] = torch.arange(10)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    staged = ckptio.async_save(state, tmp_path / "a" / "c.pt")
    staged.result()
    reset()
    monkeypatch.setenv("CKPTIO_STAGING_BUDGET_MB", "4")
    monkeypatch.setenv("CKPTIO_CHUNK_MB", "2")
    streamed = ckptio.async_save(state, tmp_path / "b" / "c.pt")
    assert streamed.mode == "streaming" and staged.mode == "staged"
    result = streamed.result()
    assert result.block_bytes == 2 << 20  # the chunk size reached the engine
    assert _mask_id(tmp_path / "a" / "c.pt") == _mask_id(tmp_path / "b" / "c.pt")


def test_streaming_returns_only_after_tensors_are_read(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTIO_STAGING_BUDGET_MB", "1")
    monkeypatch.setenv("CKPTIO_CHUNK_MB", "1")
    state = {"w": torch.randn(4 << 20)}
    expected = state["w"].clone()
    ckptio.async_save(state, tmp_path / "c.pt")
    state["w"].fill_(0)
    ckptio.wait()
    assert torch.equal(ckptio.load(tmp_path / "c.pt")["w"], expected)


def test_one_slot_waits_for_the_previous_save(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTIO_STAGING_SLOTS", "1")
    monkeypatch.setenv("CKPTIO_MAX_PENDING", "8")
    first = ckptio.async_save(_state(1, n=8 << 20), tmp_path / "a.pt")
    ckptio.async_save(_state(2), tmp_path / "b.pt")
    assert first.done()  # the only slot was busy until the first save finished
    assert get_arena().num_slots == 1
    ckptio.wait()


def test_max_pending_bounds_the_queue(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTIO_MAX_PENDING", "1")
    first = ckptio.async_save(_state(1, n=8 << 20), tmp_path / "a.pt")
    ckptio.async_save(_state(2), tmp_path / "b.pt")
    assert first.done()
    assert get_queue().max_pending == 1
    ckptio.wait()


@pytest.mark.parametrize(
    "var,value",
    [("CKPTIO_STAGING_SLOTS", "0"), ("CKPTIO_STAGING_BUDGET_MB", "lots"), ("CKPTIO_CHUNK_MB", "0"),
     ("CKPTIO_MAX_PENDING", "-3")],
)
def test_bad_staging_values_name_the_variable(tmp_path, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ckptio.ConfigError, match=var):
        ckptio.async_save(_state(1), tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()


def test_engine_copy_splits_spans_across_threads_exactly():
    """The snapshot's one engine call: spans of every size, including ones cut
    between copy threads (parts are >= 4 MiB) and empty ones."""
    from ckptio._engine import get_engine

    g = torch.Generator().manual_seed(5)
    sizes = [0, 1, 4095, 4096, 3 << 20, 9 << 20 | 17, 5, 12 << 20, 0, 77]
    sources = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]
    destinations = [torch.zeros(n + 64, dtype=torch.uint8) for n in sizes]  # 64 guard bytes after each
    get_engine().copy([(s.data_ptr(), d.data_ptr(), n) for s, d, n in zip(sources, destinations, sizes)])
    for s, d, n in zip(sources, destinations, sizes):
        assert torch.equal(d[:n], s)
        assert int(d[n:].count_nonzero()) == 0  # nothing written past a span


def test_snapshot_of_many_tensors_of_mixed_sizes_is_exact(tmp_path):
    g = torch.Generator().manual_seed(6)
    state = {f"t{i}": torch.randn(int(n), generator=g)
             for i, n in enumerate(torch.randint(0, 1 << 20, (300,), generator=g))}
    expected = {k: v.clone() for k, v in state.items()}
    handle = ckptio.async_save(state, tmp_path / "many.pt")
    for v in state.values():
        v.fill_(-1.0)  # after the call: must not reach the file
    handle.result()
    assert_same(torch.load(tmp_path / "many.pt", weights_only=True), expected)


def _slot_addresses(arena):
    return sorted(s.buffer.address if s.buffer is not None else 0 for s in arena._slots)


def test_the_first_save_grows_the_other_slot_in_the_background(tmp_path):
    """Only the first snapshot faults memory on the caller's thread; the
    second slot is faulted by a background thread, then reused warm."""
    import threading

    state = {"w": torch.randn(4 << 20)}  # 16 MiB
    ckptio.async_save(state, tmp_path / "a.pt").result()
    arena = get_arena()
    arena.join_background()
    assert all(s.capacity >= 16 << 20 for s in arena._slots)
    warm = _slot_addresses(arena)
    for i in range(4):
        ckptio.async_save(state, tmp_path / f"b{i}.pt")  # back to back: both slots in use
    ckptio.wait()
    assert _slot_addresses(arena) == warm  # no slot was re-allocated
    reset()
    assert not [t for t in threading.enumerate() if t.name == "ckptio-staging-prefault"]


def test_reserve_staging_faults_every_slot_before_the_first_save(tmp_path):
    state = {"model": {f"w{i}": torch.randn(1000 + i) for i in range(50)}, "step": 3}
    reserved = ckptio.reserve_staging(state, wait=True)
    arena = get_arena()
    assert all(s.capacity >= reserved for s in arena._slots)
    warm = _slot_addresses(arena)
    io = AsyncCheckpointIO()
    for i in range(3):
        io.save_checkpoint(state, str(tmp_path / f"{i}.ckpt"))
    io.teardown()
    assert _slot_addresses(arena) == warm  # the exact size was reserved: nothing grew
    assert_same(torch.load(tmp_path / "2.ckpt", weights_only=True), state)


def test_reserve_by_bytes_and_through_the_plugin(tmp_path):
    with pytest.raises(ValueError, match="size must be >= 0"):
        ckptio.reserve_staging(-1)
    io = AsyncCheckpointIO(reserve=8 << 20)
    io.teardown()  # joins the background faulting
    assert all(s.capacity >= 8 << 20 for s in get_arena()._slots)
    io.save_checkpoint({"w": torch.ones(1 << 20)}, str(tmp_path / "r.ckpt"))
    io.teardown()
    assert torch.equal(torch.load(tmp_path / "r.ckpt")["w"], torch.ones(1 << 20))
