"""Eight threads saving, loading, verifying and removing their own paths at
once, for a bounded time: no deadlock, every file valid, and every failure
reaches the thread (and names the save) it belongs to."""

import os
import threading
import time

import pytest
import torch

import ckptio
from ckptio.background import reset


@pytest.fixture(autouse=True)
def drained():
    reset()
    yield
    reset()


def test_eight_threads_never_mix_up_files_or_errors(tmp_path, make_read_only):
    locked = tmp_path / "locked"
    locked.mkdir()
    make_read_only(locked)
    deadline = time.monotonic() + 8.0
    problems, expected, failures_seen = [], {}, {}

    def worker(t):
        rng = __import__("random").Random(t)
        my_dir = tmp_path / f"t{t}"
        my_dir.mkdir()
        io = ckptio.FastCheckpointIO()
        step = 0
        try:
            while time.monotonic() < deadline:
                step += 1
                path = my_dir / f"c{step % 3}.pt"
                state = {"t": t, "step": step, "w": torch.full((rng.choice([10, 1000, 100_000]),), float(step))}
                op = rng.random()
                if t == 7 and op < 0.3:  # this thread also makes saves that must fail
                    handle = ckptio.async_save(state, locked / f"c{step}.pt")
                    err = handle.exception(timeout=60)
                    if not isinstance(err, ckptio.CheckpointIOError) or f"c{step}.pt" not in str(err):
                        problems.append(f"t{t}: wrong error {err!r}")
                    failures_seen[t] = failures_seen.get(t, 0) + 1
                elif op < 0.5:
                    ckptio.save(state, path)
                    expected[str(path)] = (t, step)
                elif op < 0.8:
                    ckptio.async_save(state, path).result(timeout=60)
                    expected[str(path)] = (t, step)
                elif op < 0.9 and path.exists():
                    out = ckptio.load(path)
                    if (out["t"], out["step"]) != expected[str(path)]:
                        problems.append(f"t{t}: {path} holds {out['step']}, expected {expected[str(path)]}")
                elif op < 0.95 and path.exists():
                    ckptio.verify(path)
                elif path.exists():
                    io.remove_checkpoint(path)  # waits for this path's queued saves
                    expected.pop(str(path), None)
                    if path.exists():
                        problems.append(f"t{t}: {path} still there after remove")
        except Exception as e:  # any error here is one reaching the wrong place
            problems.append(f"t{t}: {e!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "deadlock: a worker never finished"
    ckptio.wait()
    assert problems == []
    assert failures_seen.get(7, 0) > 0
    for path, (t, step) in expected.items():
        if os.path.exists(path):
            out = ckptio.load(path)
            assert (out["t"], out["step"]) == (t, step), path
