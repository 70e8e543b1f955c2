"""A hung object store never holds up local checkpoints.

A real S3 API server (moto's) sits behind a TCP relay in a process of its
own; SIGSTOP freezes the relay, so the endpoint accepts connections and never
answers: the common way a remote fails, and the one a refused or dropped
connection does not show. Local saves, ``manager.save()`` and loads go on at
their usual pace; once the relay runs again the remote tier catches up to the
newest checkpoint, its ``latest`` never naming an object that is not whole.

Bounds on durations are generous (seconds where the work takes
milliseconds): what they tell apart is "waits for the network" from "does
not", on a loaded 2-core machine too.
"""

import os
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

import ckptio

pytest.importorskip("s3fs")
pytest.importorskip("moto")

import s3_server  # noqa: E402

from ckptio.remote_lane import CopySkipped  # noqa: E402

s3, s3_behind_relay = s3_server.s3, s3_server.s3_behind_relay  # fixtures

REMOTE = "s3://ckpts/run"
QUICK_S = 3.0  # a save's stall or a local load: milliseconds here; never the network's timeouts


def make_state(step, n=1 << 16):
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(n, generator=g), "b": torch.arange(64) + step}, "step": step}


def assert_state(loaded, step):
    want = make_state(step)
    assert loaded["step"] == step
    assert torch.equal(loaded["model"]["w"], want["model"]["w"])
    assert torch.equal(loaded["model"]["b"], want["model"]["b"])


class PointerWatch:
    """Reads the remote ``latest`` straight from the server every 50 ms and
    loads (CRC-verified) each object it comes to name. A missing or damaged
    one is a violation, unless the pointer has moved on by the time it is
    read (pruning may then rightly take it)."""

    def __init__(self, fs, directory):
        self.fs, self.directory = fs, directory
        self.seen = []        # the names `latest` held, in order
        self.violations = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pointer(self):
        try:
            return self.fs.cat_file("ckpts/run/latest").decode().strip()
        except FileNotFoundError:
            return None

    def _run(self):
        while not self._stop.is_set():
            name = self._pointer()
            if name is not None and (not self.seen or self.seen[-1] != name):
                self._check(name)
            self._stop.wait(0.05)

    def _check(self, name):
        try:
            data = self.fs.cat_file(f"ckpts/run/{name}")
        except FileNotFoundError:
            if self._pointer() == name:
                self.violations.append(f"latest names {name}, which does not exist")
            return
        local = self.directory / f"watched-{len(self.seen)}.pt"
        local.write_bytes(data)
        try:
            loaded = ckptio.load(local)
            assert f"step_{loaded['step']}.pt" == name, (name, loaded["step"])
            assert_state(loaded, loaded["step"])
        except Exception as e:  # noqa: BLE001 - recorded, asserted by the test
            self.violations.append(f"latest names {name}, which is not that whole checkpoint: {e!r}")
        finally:
            local.unlink()
        self.seen.append(name)

    def wait_for(self, name, timeout):
        deadline = time.monotonic() + timeout
        while not self.seen or self.seen[-1] != name:
            assert time.monotonic() < deadline, f"the remote `latest` never came to name {name}: {self.seen}"
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        self._thread.join(10)


def test_a_hung_remote_never_holds_up_local_checkpoints_and_catches_up_after(s3_behind_relay, tmp_path,
                                                                            monkeypatch):
    fs, relay = s3_behind_relay
    monkeypatch.setenv("CKPTIO_REMOTE_TIMEOUT_S", "2")
    monkeypatch.setenv("CKPTIO_REMOTE_COPY_TIMEOUT_S", "60")  # healthy: generous, on a loaded machine too
    (tmp_path / "watch").mkdir()
    manager = ckptio.CheckpointManager(tmp_path / "run", keep_last=3, remote=REMOTE, keep_remote=2)
    assert manager.save(1, make_state(1)).result().remote.committed
    watch = PointerWatch(fs, tmp_path / "watch")
    watch.wait_for("step_1.pt", 30)

    handles, save_s, load_s = {}, [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkeypatch.setenv("CKPTIO_REMOTE_COPY_TIMEOUT_S", "3")  # while it hangs, a copy gives up after 3 s
        relay.pause()
        paused_at = time.monotonic()
        for step in range(2, 7):  # one checkpoint a second, for five seconds of a hung endpoint
            start = time.monotonic()
            handles[step] = manager.save(step, make_state(step))
            save_s.append(time.monotonic() - start)
            handles[step].local.result(timeout=30)  # durable locally, remote copy or not
            assert (tmp_path / "run" / "latest").read_text().strip() == f"step_{step}.pt"
            start = time.monotonic()
            assert_state(ckptio.load(manager.path_for(step)), step)  # waits for no remote copy
            load_s.append(time.monotonic() - start)
            time.sleep(max(0.0, paused_at + step - 1 - time.monotonic()))
        start = time.monotonic()
        pending = manager.wait(timeout=0.5)  # bounded, and says what is left
        assert time.monotonic() - start < QUICK_S
        assert any("step_6.pt" in p for p in pending), pending
        assert manager.steps() == [4, 5, 6] and manager.last_durable_step == 6
        start = time.monotonic()
        assert manager.latest_step() == 6  # resuming: the remote tier cannot be listed, the local one serves
        listing_s = time.monotonic() - start
        assert watch.seen == ["step_1.pt"]  # nothing reached the server meanwhile
        hung_s = time.monotonic() - paused_at

        monkeypatch.setenv("CKPTIO_REMOTE_COPY_TIMEOUT_S", "60")
        relay.resume()
        resumed_at = time.monotonic()
        watch.wait_for("step_6.pt", 60)  # caught up to the newest
        caught_up_s = time.monotonic() - resumed_at
        assert manager.close(timeout=60) == []
    watch.stop()

    print(f"\nremote hung {hung_s:.1f} s: manager.save() took at most {max(save_s) * 1e3:.0f} ms, a local load "
          f"{max(load_s) * 1e3:.0f} ms, latest_step() {listing_s:.1f} s; caught up to the newest "
          f"{caught_up_s:.1f} s after the relay resumed")
    assert max(save_s) < QUICK_S and max(load_s) < QUICK_S
    assert listing_s < 2 * 3 + 10  # a few request timeouts (CKPTIO_REMOTE_TIMEOUT_S x 3 attempts), not minutes
    assert any("cannot list the remote tier" in str(w.message) for w in caught)
    assert watch.violations == []
    assert "step_6.pt" in manager.remote.names(manager._pattern) and manager.last_remote_step == 6
    assert len(manager.remote_steps()) <= 2 + 1  # keep_remote=2 (+ an abandoned upload that landed late)
    copies = {step: h.result().remote for step, h in handles.items()}
    assert copies[6].committed
    assert isinstance(copies[2].error, TimeoutError)  # it started as the relay froze: abandoned at its deadline
    skipped = [s for s, c in copies.items() if isinstance(c.error, CopySkipped)]
    assert skipped, copies  # coalesced: the remote caught up to the newest, not through every step
    behind = [w for w in caught if "falling behind" in str(w.message)]
    assert len(behind) == 1, [str(w.message) for w in caught]  # reported once for the whole episode
    assert_state(ckptio.load(f"{REMOTE}/step_6.pt"), 6)


def test_the_copy_deadline_holds_when_a_request_never_times_out(s3_behind_relay, tmp_path, monkeypatch):
    fs, relay = s3_behind_relay
    monkeypatch.setenv("CKPTIO_REMOTE_TIMEOUT_S", "3600")  # the library would wait an hour per request
    monkeypatch.setenv("CKPTIO_REMOTE_COPY_TIMEOUT_S", "60")
    manager = ckptio.CheckpointManager(tmp_path / "run", keep_last=2, remote=REMOTE)
    assert manager.save(1, make_state(1)).result().remote.committed

    monkeypatch.setenv("CKPTIO_REMOTE_COPY_TIMEOUT_S", "2")
    relay.pause()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        handle = manager.save(2, make_state(2))
        handle.local.result(timeout=30)
        start = time.monotonic()
        copy = handle.result(timeout=60).remote
        assert time.monotonic() - start < 2 + 10
        assert isinstance(copy.error, TimeoutError) and "CKPTIO_REMOTE_COPY_TIMEOUT_S" in str(copy.error)

        later = manager.save(3, make_state(3))
        later.local.result(timeout=30)
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match="remote work still pending"):
            pending = manager.close(timeout=0.5)
        assert time.monotonic() - start < QUICK_S  # close() does not hang on a hung remote
        assert any("step_3.pt" in p for p in pending), pending
        assert fs.cat_file("ckpts/run/latest").decode().strip() == "step_1.pt"
        assert_state(ckptio.load(manager.path_for(3)), 3)

        relay.resume()
        later.result(timeout=60)  # the lane settles that copy on its own, committed or timed out
    fs.invalidate_cache()
    named = fs.cat_file("ckpts/run/latest").decode().strip()
    assert named in ("step_1.pt", "step_3.pt")
    assert_state(ckptio.load(f"{REMOTE}/{named}"), int(named[5:-3]))


def test_synchronous_saves_do_not_wait_for_a_hung_remote(s3_behind_relay, tmp_path, monkeypatch):
    """async_save=False: durable locally when save() returns, the copy left
    pending in the lane, never the network's timeouts on the caller."""
    fs, relay = s3_behind_relay
    monkeypatch.setenv("CKPTIO_REMOTE_TIMEOUT_S", "3600")
    manager = ckptio.CheckpointManager(tmp_path / "run", keep_last=3, remote=REMOTE, async_save=False)
    relay.pause()
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            for step in (1, 2, 3):
                start = time.monotonic()
                result = manager.save(step, make_state(step))
                assert time.monotonic() - start < QUICK_S
                assert result.remote.pending and not result.remote.committed
                assert_state(ckptio.load(manager.path_for(step)), step)
            assert manager.wait(timeout=0.5)  # the copies are still pending, and wait() says so
    finally:
        relay.resume()
    assert manager.wait(timeout=60) == []
    assert manager.last_remote_step == 3
    fs.invalidate_cache()
    assert fs.cat_file("ckpts/run/latest").decode().strip() == "step_3.pt"
    assert_state(ckptio.load(f"{REMOTE}/step_3.pt"), 3)
    manager.close()


EXIT_RIGHT_AFTER_A_SAVE = """
import sys, time, fsspec, ckptio
fsspec.config.conf["s3"] = {"endpoint_url": sys.argv[2], "key": "testing", "secret": "testing"}
sys.path.insert(0, sys.argv[3])
from test_remote_hang import make_state
manager = ckptio.CheckpointManager(sys.argv[1], keep_last=2, remote="s3://ckpts/run")
step = int(sys.argv[4])
manager.save(step, make_state(step)).local.result()
print("durable", flush=True)
"""


def _exit_right_after_a_save(step, run, relay, copy_timeout):
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               CKPTIO_REMOTE_TIMEOUT_S="3600", CKPTIO_REMOTE_COPY_TIMEOUT_S=str(copy_timeout))
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", EXIT_RIGHT_AFTER_A_SAVE, str(run), relay.url, tests, str(step)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["durable"]
    return out.stderr


def test_interpreter_exit_is_bounded_while_the_remote_hangs_and_copies_the_last_save_when_not(s3_behind_relay,
                                                                                             tmp_path):
    fs, relay = s3_behind_relay
    relay.pause()
    stderr = _exit_right_after_a_save(7, tmp_path / "run", relay, copy_timeout=3)
    assert "finishing remote copies before exit" in stderr
    assert "exiting with remote work not done" in stderr or "took longer than" in stderr, stderr
    assert_state(ckptio.load(tmp_path / "run" / "step_7.pt"), 7)

    relay.resume()  # healthy: the copy queued just before exit is made before the process ends
    _exit_right_after_a_save(8, tmp_path / "run", relay, copy_timeout=60)
    assert fs.cat_file("ckpts/run/latest").decode().strip() == "step_8.pt"
    assert_state(ckptio.load(f"{REMOTE}/step_8.pt"), 8)


@pytest.mark.parametrize("var,value", [("CKPTIO_REMOTE_TIMEOUT_S", "0"), ("CKPTIO_REMOTE_TIMEOUT_S", "soon"),
                                       ("CKPTIO_REMOTE_COPY_TIMEOUT_S", "-1")])
def test_a_bad_remote_timeout_names_the_variable(tmp_path, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ckptio.ConfigError, match=var):
        ckptio.CheckpointManager(tmp_path / "run", remote=REMOTE)
