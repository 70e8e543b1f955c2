"""Crash harness: SIGKILL at random moments during saves of every backend,
sizes from KB to 1 GiB. After every kill the destination holds exactly the
previous checkpoint (same bytes) or exactly the new one (complete, the new
values), never a torn file; temporaries of killed writers are gone after the
next save into the directory.

Children are forked from this process after torch and ckptio are imported, so
a trial costs the save itself rather than an interpreter start.
CKPTIO_CRASH_TRIALS sets the number of kills (default 120; 200 and more
for a longer search).
"""

import os
import random
import signal
import time

import pytest
import torch

import ckptio
from conftest import leftover_temporaries

pytestmark = pytest.mark.slow

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
# (bytes, trials in 200, longest plausible save in seconds: kills land inside it)
SIZES = [(4 * KIB, 50, 0.006), (256 * KIB, 50, 0.012), (8 * MIB, 50, 0.06), (64 * MIB, 42, 0.25), (GIB, 8, 3.0)]
BACKENDS = ["sync", "async", "torch", "async_torch"]


def _child(backend: str, path: str, step: int, nbytes: int, ready_fd: int) -> None:
    try:
        torch.set_num_threads(1)
        state = {"w": torch.full((nbytes // 4,), float(step)), "step": step}
        os.write(ready_fd, b"1")
        if backend == "sync":
            ckptio.save(state, path)
        elif backend == "async":
            ckptio.async_save(state, path).result()
        elif backend == "torch":
            ckptio.TorchCheckpointIO().save_checkpoint(state, path)
        else:
            io = ckptio.AsyncCheckpointIO(ckptio.TorchCheckpointIO())
            io.save_checkpoint(state, path)
            io.teardown()
    finally:
        os._exit(0)


def _check(path, before: bytes, step: int, nbytes: int) -> str:
    data = path.read_bytes()
    if data == before:
        return "old"
    out = torch.load(path, weights_only=True)  # a complete new checkpoint, or this raises
    assert out["step"] == step, f"step {out['step']} != {step}"
    w = out["w"]
    assert w.numel() == nbytes // 4 and bool((w == float(step)).all()), "torn tensor"
    ckptio.verify(path)
    return "new"


def test_sigkill_at_random_moments_never_leaves_a_torn_checkpoint(tmp_path):
    torch.set_num_threads(1)  # no OpenMP pool in the parent: forked children stay safe
    trials = int(os.environ.get("CKPTIO_CRASH_TRIALS", "120"))
    rng = random.Random(20261128)
    plan = [size for size in SIZES for _ in range(max(1, size[1] * trials // 200))]
    rng.shuffle(plan)
    path = tmp_path / "ckpt.pt"
    ckptio.TorchCheckpointIO().save_checkpoint({"w": torch.zeros(4), "step": 0}, str(path))
    counts = {"old": 0, "new": 0}
    for step, (nbytes, _, longest) in enumerate(plan, start=1):
        backend = BACKENDS[step % len(BACKENDS)]
        before = path.read_bytes()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child(backend, str(path), step, nbytes, w)
        os.close(w)
        assert os.read(r, 1) == b"1", "child died before saving"
        os.close(r)
        time.sleep(rng.uniform(0, longest))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        counts[_check(path, before, step, nbytes)] += 1
    assert counts["old"] + counts["new"] == len(plan)
    assert counts["old"] > 0 and counts["new"] > 0, counts  # kills landed both before and after commits
    ckptio.save({"w": torch.ones(4), "step": -1}, path)  # the next save clears killed writers' temporaries
    assert leftover_temporaries(tmp_path) == []
    print(f"{len(plan)} kills: {counts}")
