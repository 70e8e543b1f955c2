"""The checkpoint service makes a CheckpointManager's remote copies, in a
lane of its own: a trainer killed while its copies hang on the network
loses none of them, and the hang never delays a local write.

A real S3 API server (moto's) behind a relay process that the test freezes
(SIGSTOP: the endpoint accepts connections and never answers), a real
trainer process, SIGKILLed, and the real service it started.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import ckptio

pytest.importorskip("s3fs")
pytest.importorskip("moto")

import s3_server  # noqa: E402
from conftest import service_pids  # noqa: E402
from test_service import assert_state, service_dir  # noqa: E402, F401 - a fixture

s3, s3_behind_relay = s3_server.s3, s3_server.s3_behind_relay  # fixtures

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK_S = 10.0  # a local write of 4 MiB (the first starts the service): never the network's 30 s timeouts

_TRAINER = textwrap.dedent("""
    import os, sys, time, ckptio
    sys.path.insert(0, {here!r})
    from test_service import make_state
    manager = ckptio.CheckpointManager(sys.argv[1], keep_last=2, remote="s3://ckpts/run", keep_remote=2)
    for step in (1, 2, 3):
        start = time.monotonic()
        handle = manager.save(step, make_state(step))
        handle.local.result(timeout=60)  # durable on the local disk, written by the service
        print(step, time.monotonic() - start, flush=True)
    os.kill(os.getpid(), 9)  # its remote copies are still waiting on the frozen endpoint
""")


def test_a_killed_trainers_remote_copies_are_finished_by_the_service(service_dir, s3_behind_relay, tmp_path):  # noqa: F811
    fs, relay = s3_behind_relay
    env = dict(os.environ, FSSPEC_S3_ENDPOINT_URL=relay.url, FSSPEC_S3_KEY="testing", FSSPEC_S3_SECRET="testing",
               CKPTIO_REMOTE_COPY_TIMEOUT_S="120", CKPTIO_SERVICE_IDLE_S="2")
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER.format(here=HERE))
    relay.pause()
    try:
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        local_s = dict(line.split() for line in proc.stdout.split("\n") if line)
        assert sorted(local_s) == ["1", "2", "3"] and max(map(float, local_s.values())) < QUICK_S, local_s
        assert (tmp_path / "run" / "latest").read_text() == "step_3.pt\n"
        assert fs.ls("ckpts") == [] or not fs.ls("ckpts/run")  # nothing reached the server: the trainer is gone
        (pid,) = service_pids(service_dir)  # ... and the service holds its copies
    finally:
        relay.resume()
    def remote_names():
        fs.invalidate_cache()
        return sorted(n.rsplit("/", 1)[1] for n in fs.ls("ckpts/run")) if fs.exists("ckpts/run") else []

    deadline = time.monotonic() + 90  # keep_remote=2: the service prunes step 1 as the trainer's lane would have
    while remote_names() != ["latest", "step_2.pt", "step_3.pt"]:
        assert time.monotonic() < deadline, f"the service never finished the killed trainer's copies: {remote_names()}"
        time.sleep(0.1)
    assert fs.cat_file("ckpts/run/latest") == b"step_3.pt\n"
    for step in (2, 3):
        with fs.open(f"ckpts/run/step_{step}.pt", "rb") as f:
            assert_state(torch.load(f, weights_only=True), step)
    deadline = time.monotonic() + 30
    while service_pids(service_dir):  # nothing pending, nobody connected: it goes
        assert time.monotonic() < deadline, "the service did not exit once its remote copies were done"
        time.sleep(0.1)


def test_a_remote_copy_through_the_service_reports_to_the_save_handle(service_dir, s3, tmp_path):  # noqa: F811
    fs, _ = s3
    manager = ckptio.CheckpointManager(tmp_path / "run", keep_last=1, remote="s3://ckpts/run", keep_remote=1)
    for step in (1, 2):
        result = manager.save(step, {"w": torch.full((1 << 16,), float(step))}).result(timeout=60)
        assert result.remote is not None and result.remote.committed, result.remote
    assert manager.last_remote_step == 2 and manager.remote_steps() == [2]
    assert service_pids(service_dir)  # the service made them: this trainer's lane never ran
    assert manager.remote._lane is None
    assert torch.equal(ckptio.load("s3://ckpts/run/step_2.pt")["w"], torch.full((1 << 16,), 2.0))
    assert manager.close() == []


def test_a_service_killed_mid_copy_leaves_the_copy_to_the_trainer(service_dir, s3_behind_relay, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    fs, relay = s3_behind_relay
    monkeypatch.setenv("CKPTIO_REMOTE_COPY_TIMEOUT_S", "120")
    manager = ckptio.CheckpointManager(tmp_path / "run", keep_last=1, remote="s3://ckpts/run", keep_remote=1)
    relay.pause()
    try:
        handle = manager.save(1, {"w": torch.full((1 << 16,), 1.0)})
        handle.local.result(timeout=60)  # durable, written by the service, whose copy now hangs
        (pid,) = service_pids(service_dir)
        assert any("by the checkpoint service" in p for p in manager.remote.pending())
        os.kill(pid, signal.SIGKILL)  # the trainer hears it go and queues the copy in its own lane
    finally:
        relay.resume()
    result = handle.result(timeout=90)
    assert result.remote.committed, result.remote
    assert manager.remote._lane is not None  # made here, after the service was gone
    assert fs.cat_file("ckpts/run/latest") == b"step_1.pt\n" and manager.last_remote_step == 1
    assert manager.close() == []


def test_the_service_makes_remote_copies_without_torch():
    """What the service imports for a remote tier (its lane, fsspec) brings no torch in."""
    from ckptio.service.client import boot_command

    boot = boot_command("unused", detach=False)[2].split("from ckptio.service.server")[0]
    code = boot + "import ckptio.service.server, ckptio.remote_tier\nprint('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
