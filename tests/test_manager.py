"""CheckpointManager: rotation, the latest pointer, and crash safety."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch

import ckptio
from ckptio.background import reset


@pytest.fixture(autouse=True)
def drained():
    reset()
    yield
    reset()


def _state(step):
    return {"w": torch.full((1 << 16,), float(step)), "step": step}


@pytest.mark.parametrize("async_save", [True, False])
def test_keeps_the_last_n_and_resumes_from_the_newest(tmp_path, async_save):
    manager = ckptio.CheckpointManager(tmp_path, keep_last=3, async_save=async_save)
    for step in range(0, 100, 10):
        manager.save(step, _state(step))
    manager.wait()
    assert manager.steps() == [70, 80, 90]
    assert (tmp_path / "latest").read_text().strip() == "step_90.pt"
    assert manager.latest_step() == 90
    assert manager.load_latest()["step"] == 90
    manager.close()
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_70.pt", "step_80.pt", "step_90.pt"]


def test_empty_directory_has_no_latest(tmp_path):
    manager = ckptio.CheckpointManager(tmp_path)
    assert manager.latest() is None
    with pytest.raises(ckptio.CheckpointNotFoundError):
        manager.load_latest()


def test_damaged_newest_falls_back_to_the_previous(tmp_path):
    manager = ckptio.CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2):
        manager.save(step, _state(step))
    manager.wait()
    path = tmp_path / "step_2.pt"
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        header = z.getinfo("step_2/data/0").header_offset
    n, m = int.from_bytes(data[header + 26 : header + 28], "little"), int.from_bytes(data[header + 28 : header + 30], "little")
    data[header + 30 + n + m + 10] ^= 0xFF  # inside the tensor's payload
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged"):
        assert manager.load_latest()["step"] == 1


def test_pointer_lagging_behind_a_newer_complete_checkpoint(tmp_path):
    # A crash after step 3's rename but before the pointer moved.
    manager = ckptio.CheckpointManager(tmp_path, keep_last=None, async_save=False)
    manager.save(2, _state(2))
    ckptio.save(_state(3), tmp_path / "step_3.pt")
    assert manager.latest_step() == 3


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, torch, ckptio
    manager = ckptio.CheckpointManager(sys.argv[1], keep_last=2)
    state = {"w": torch.zeros(8 << 20), "step": 0}  # 32 MiB
    step = 0
    while True:
        step += 1
        state["w"].fill_(float(step))
        state["step"] = step
        manager.save(step, state)
        print(step, flush=True)
    """
)


def test_sigkill_at_random_moments_always_leaves_a_loadable_latest(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    rng = __import__("random").Random(0)
    for trial in range(6):
        d = tmp_path / f"run{trial}"
        proc = subprocess.Popen([sys.executable, str(script), str(d)], stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # it is saving
        assert first.strip(), "the writer did not start"
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        manager = ckptio.CheckpointManager(d, keep_last=2)
        step = manager.latest_step()
        if step is None:  # killed before the first save became durable
            assert not any(n.startswith("step_") for n in os.listdir(d))
            continue
        state = manager.load_latest()  # CRC-verified
        assert state["step"] == step and state["w"].eq(float(step)).all()
