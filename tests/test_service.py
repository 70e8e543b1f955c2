"""The checkpoint service (ckptio.service): a writer process that outlives
the trainer. Real processes, real SIGKILLs, real shared memory: a trainer
killed after async_save returned loses nothing; a service killed mid-write
loses nothing; the memory tier serves a restart; other users are refused;
the service runs no torch and goes away when idle."""

import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch

import ckptio
from ckptio.background import reset
from ckptio.service import client as service_client
from ckptio.service import wire
from conftest import service_pids

HERE = os.path.dirname(os.path.abspath(__file__))


def make_state(seed, n=1 << 20):
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(n, generator=g), "b": torch.arange(64) + seed}, "step": seed}


def assert_state(loaded, seed, n=1 << 20):
    want = make_state(seed, n)
    assert loaded["step"] == seed
    assert torch.equal(loaded["model"]["w"], want["model"]["w"])
    assert torch.equal(loaded["model"]["b"], want["model"]["b"])


@pytest.fixture
def service_dir(tmp_path, monkeypatch):
    """Saves of this test go through a service of its own, which exits 2 s after its last client."""
    directory = tmp_path / "service"
    monkeypatch.setenv("CKPTIO_SERVICE", "1")
    monkeypatch.setenv("CKPTIO_SERVICE_DIR", str(directory))
    monkeypatch.setenv("CKPTIO_SERVICE_IDLE_S", "2")
    monkeypatch.setenv("CKPTIO_MEMORY_KEEP_S", "2")
    reset()
    service_client.reset_client()
    yield directory
    reset()
    service_client.reset_client()
    for pid in service_pids(directory):
        os.kill(pid, signal.SIGKILL)


def _wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_saves_through_the_service_load_with_torch_and_the_service_runs_no_torch(service_dir, tmp_path):
    handles = [ckptio.async_save(make_state(s), tmp_path / f"s{s}.pt") for s in range(3)]
    for h in handles:
        assert h.result().bytes > 4 << 20
    for s in range(3):
        assert_state(torch.load(tmp_path / f"s{s}.pt", weights_only=True), s)
    (pid,) = service_pids(service_dir)
    assert pid != os.getpid() and os.getsid(pid) != os.getsid(0)  # detached: its own session
    with open(f"/proc/{pid}/maps") as f:
        assert "libtorch" not in f.read()  # the engine and a socket, nothing more
    assert service_client.status()["served"] == 3
    mode = os.stat(service_dir).st_mode & 0o777
    assert mode == 0o700 and os.stat(service_dir / "service.sock").st_mode & 0o777 == 0o600
    reset()
    service_client.reset_client()  # the trainer lets go: the service exits once idle
    _wait_until(lambda: not service_pids(service_dir), 10, "the idle service to exit")
    assert not (service_dir / "service.sock").exists()


_TRAINER = textwrap.dedent("""
    import os, sys, torch, ckptio
    sys.path.insert(0, {here!r})
    from test_service import make_state
    out, runs = sys.argv[1], int(sys.argv[2])
    for run in range(runs):
        path = os.path.join(out, f"run{{run}}.pt")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # one trainer per run: killed by the parent once async_save has returned
            os.close(r)
            state = make_state(run, 16 << 20)
            handle = ckptio.async_save(state, path)
            os.write(w, b"R")
            os.close(w)
            state["model"]["w"].fill_(-1.0)  # the caller owns its tensors again: this must not be saved
            handle.wait()
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"R"
        os.close(r)
        import random, time
        time.sleep(random.Random(run).uniform(0, 0.01))
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print(run, int(os.path.exists(path)), flush=True)  # 0: killed before its file was durable
""")


def test_a_trainer_killed_after_async_save_returned_loses_nothing(service_dir, tmp_path):
    """20 trainers, each SIGKILLed 0-10 ms after async_save returned, most
    before the file was durable (the parent looks for it right after the
    kill): every file ends whole, as snapshotted."""
    runs = 20
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER.format(here=HERE))
    proc = subprocess.run([sys.executable, str(script), str(out), str(runs)], capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    durable_at_kill = dict(line.split() for line in proc.stdout.split("\n") if line)
    assert len(durable_at_kill) == runs
    # The case this test is about: killed before the file was durable (14 of 20 here on a loaded 2-core VM).
    assert list(durable_at_kill.values()).count("0") >= runs // 4, durable_at_kill
    _wait_until(lambda: len([n for n in os.listdir(out) if n.endswith(".pt")]) == runs, 60,
                "every handed-over save to land")
    assert [n for n in os.listdir(out) if not n.endswith(".pt")] == []  # no torn or temporary file
    for run in range(runs):
        assert_state(ckptio.load(out / f"run{run}.pt"), run, 16 << 20)  # CRC-verified, as snapshotted
    _wait_until(lambda: not service_pids(service_dir), 15, "the idle service to exit")


def test_the_service_killed_mid_write_loses_nothing_and_the_next_save_starts_another(service_dir, tmp_path):
    n = 64 << 20  # 256 MiB: the service is still writing when it is killed
    first = ckptio.async_save(make_state(1, 1 << 10), tmp_path / "warm.pt")
    first.result()
    (pid,) = service_pids(service_dir)
    state = make_state(2, n)
    # The warning comes from the save queue's thread, maybe before result() is called: catch it from here on.
    with pytest.warns(RuntimeWarning, match="writing it in this process"):
        handle = ckptio.async_save(state, tmp_path / "big.pt")
        os.kill(pid, signal.SIGKILL)
        result = handle.result(timeout=120)  # the trainer wrote it itself, from the memory it still maps
    assert result.bytes > n * 4
    assert_state(ckptio.load(tmp_path / "big.pt"), 2, n)
    assert sorted(os.listdir(tmp_path)) == ["big.pt", "service", "warm.pt"]  # nothing torn beside them
    ckptio.async_save(make_state(3), tmp_path / "after.pt").result()
    assert service_pids(service_dir) not in ([], [pid])  # a new service took over
    assert_state(ckptio.load(tmp_path / "after.pt"), 3)


def test_a_restarted_trainer_resumes_from_the_memory_tier(service_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTIO_MEMORY_KEEP_S", "120")  # kept while no trainer is connected, however slow the restart
    code = textwrap.dedent(f"""
        import sys, ckptio
        sys.path.insert(0, {HERE!r})
        from test_service import make_state
        manager = ckptio.CheckpointManager({str(tmp_path / 'run')!r}, keep_last=3, memory=2)
        for step in (10, 20, 30):
            manager.save(step, make_state(step))
        manager.wait()
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=os.environ.copy())
    manager = ckptio.CheckpointManager(tmp_path / "run", keep_last=3, memory=2)
    assert manager.memory_steps() == [20, 30] and manager.steps() == [10, 20, 30]
    target = make_state(0)
    loaded = manager.load_latest(into=target)
    assert manager.last_loaded.tier == "memory" and manager.last_loaded.step == 30
    assert loaded["model"]["w"] is target["model"]["w"]
    assert_state(dict(target, step=30), 30)
    # A damaged memory image is skipped for the same step on disk.
    image = manager.last_loaded.path
    data = bytearray(open(image, "rb").read())
    data[len(data) // 2] ^= 1
    with open(image, "wb") as f:
        f.write(data)
    with pytest.warns(UserWarning, match="skipping damaged"):
        assert_state(manager.load_latest(), 30)
    assert manager.last_loaded.tier == "local"


def test_a_client_of_another_uid_is_refused(service_dir, tmp_path, monkeypatch):
    if os.getuid() != 0:
        pytest.skip("dropping to another uid needs root")
    # A directory other users could reach if its permissions let them (tmp_path's parents do not).
    shared = tempfile.mkdtemp(prefix="ckptio-uid-test-", dir="/tmp")
    os.chmod(shared, 0o755)
    directory = os.path.join(shared, "service")
    monkeypatch.setenv("CKPTIO_SERVICE_DIR", directory)
    service_client.reset_client()
    try:
        ckptio.async_save(make_state(1, 16), tmp_path / "a.pt").result()  # the service runs
        sock_path = os.path.join(directory, "service.sock")
        child = textwrap.dedent(f"""
            import os, socket, json, struct
            os.setgid(65534); os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect({sock_path!r})
            except PermissionError:
                print("EACCES"); raise SystemExit
            n = struct.unpack(">I", s.recv(4))[0]
            print(json.loads(s.recv(n))["op"])
        """)
        # The directory (0700) keeps other users out ...
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "EACCES", out.stderr
        # ... and with the file permissions opened up, the peer credentials still do.
        os.chmod(directory, 0o755)
        os.chmod(sock_path, 0o777)
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "refused", out.stderr
        ckptio.async_save(make_state(2), tmp_path / "b.pt").result()  # and it goes on serving its own user
        assert_state(ckptio.load(tmp_path / "b.pt"), 2)
    finally:
        reset()
        service_client.reset_client()
        for pid in service_pids(directory):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(shared, ignore_errors=True)


def test_a_hostile_client_gets_errors_and_the_service_goes_on(service_dir, tmp_path):
    ckptio.async_save(make_state(1, 16), tmp_path / "a.pt").result()
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(service_dir / "service.sock"))

    def ask(payload):
        sock.sendall(struct.pack(">I", len(payload)) + payload)
        n = struct.unpack(">I", sock.recv(4))[0]
        return json.loads(sock.recv(n))

    assert ask(b"\x80\x04K\x01.")["op"] == "error"  # a pickle is not a message
    assert ask(b"[1, 2]")["op"] == "error"
    assert ask(json.dumps({"op": "write", "id": 1, "path": "relative", "records": [], "alignment": 64}).encode())["op"] \
        == "error"
    run = ["x/data/", "run", wire.encode_ints([0]), wire.encode_ints([1 << 40])]  # outside any segment
    bad = {"op": "write", "id": 2, "path": str(tmp_path / "x.pt"), "alignment": 64, "records": [run]}
    reply = ask(json.dumps(bad).encode())
    assert reply["op"] == "done" and reply["ok"] is False and "outside the segment" in reply["error"]
    sock.close()
    assert not (tmp_path / "x.pt").exists()
    ckptio.async_save(make_state(2), tmp_path / "b.pt").result()
    assert_state(ckptio.load(tmp_path / "b.pt"), 2)
    assert len(service_pids(service_dir)) == 1


def test_ranks_of_a_node_share_one_service(service_dir, tmp_path):
    code = textwrap.dedent(f"""
        import sys, ckptio
        sys.path.insert(0, {HERE!r})
        from test_service import make_state
        rank = int(sys.argv[1])
        for step in range(3):
            ckptio.async_save(make_state(rank * 10 + step), f"{tmp_path}/r{{rank}}_{{step}}.pt")
        ckptio.wait()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank)], env=os.environ.copy()) for rank in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert len(service_pids(service_dir)) == 1
    for rank in range(3):
        for step in range(3):
            assert_state(ckptio.load(tmp_path / f"r{rank}_{step}.pt"), rank * 10 + step)


def test_without_a_service_the_memory_tier_is_written_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTIO_SERVICE_DIR", str(tmp_path / "service"))
    manager = ckptio.CheckpointManager(tmp_path / "run", memory=1, async_save=False)
    manager.save(5, make_state(5))
    assert manager.memory_steps() == [5] and not (tmp_path / "service" / "service.sock").exists()
    assert_state(manager.load_latest(), 5)
    assert manager.last_loaded.tier == "memory"


def test_bad_service_settings_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTIO_SERVICE", "maybe")
    with pytest.raises(ckptio.ConfigError, match="CKPTIO_SERVICE"):
        ckptio.CheckpointManager(tmp_path, memory=1)
    monkeypatch.setenv("CKPTIO_SERVICE", "1")
    monkeypatch.setenv("CKPTIO_MEMORY_BYTES", "lots")
    with pytest.raises(ckptio.ConfigError, match="CKPTIO_MEMORY_BYTES"):
        ckptio.CheckpointManager(tmp_path, memory=1)
    with pytest.raises(ValueError, match="memory"):
        ckptio.CheckpointManager(tmp_path, memory=-1)



def test_odd_states_go_through_the_service(service_dir, tmp_path):
    odd = {"empty": torch.empty(0), "scalar": torch.tensor(3.5), "view": torch.arange(10)[2:5], "n": 7}
    ckptio.async_save(odd, tmp_path / "odd.pt").result()
    ckptio.async_save({"no": "tensors"}, tmp_path / "none.pt").result()
    loaded = torch.load(tmp_path / "odd.pt", weights_only=True)
    assert loaded["empty"].numel() == 0 and float(loaded["scalar"]) == 3.5 and loaded["n"] == 7
    assert torch.equal(loaded["view"], torch.arange(2, 5))
    assert torch.load(tmp_path / "none.pt", weights_only=True) == {"no": "tensors"}
    assert service_client.status()["served"] == 2


def test_a_memory_tier_over_its_budget_warns_and_the_disk_copy_stands(service_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTIO_MEMORY_BYTES", str(1 << 20))  # smaller than one checkpoint
    manager = ckptio.CheckpointManager(tmp_path / "run", memory=2)
    with pytest.warns(RuntimeWarning, match="budget"):
        manager.save(1, make_state(1)).result()
    assert manager.memory_steps() == [] and manager.steps() == [1]
    assert_state(manager.load_latest(), 1)
    assert manager.last_loaded.tier == "local"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ckptio", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_ckptio_serve_and_list_as_an_operator_runs_them(service_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTIO_MEMORY_KEEP_S", "120")  # it must still run when --stop comes, however slow the CLI
    out = _cli("serve", "--status")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no checkpoint service is running" in out.stderr
    out = _cli("serve", env={"CKPTIO_SERVICE_IDLE_S": "soon"})
    assert out.returncode == 3 and "CKPTIO_SERVICE_IDLE_S" in out.stderr and "Traceback" not in out.stderr
    out = _cli("serve", "--status", "--stop")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    manager = ckptio.CheckpointManager(tmp_path / "run", keep_last=1, memory=2)
    for step in (1, 2):
        manager.save(step, make_state(step, 1024)).result()
    out = _cli("serve", "--status")
    assert out.returncode == 0 and "memory-tier images 2" in out.stdout, out.stderr
    out = _cli("list", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0].split() == ["step", "local", "remote", "memory", "note"]
    assert lines[1].split() == ["2", "whole", "-", "whole"] and lines[2].split() == ["1", "-", "-", "whole", "memory-only"]
    pid = service_client.status()["pid"]
    reset()
    service_client.reset_client()
    out = _cli("serve", "--stop")
    assert out.returncode == 0 and str(pid) in out.stdout
    assert not service_pids(service_dir) and not (service_dir / "memory").exists()  # its images went with it


def test_async_checkpoint_io_with_service_and_memory(service_dir, tmp_path):
    io = ckptio.AsyncCheckpointIO(service=True, memory=1)
    io.save_checkpoint(make_state(1), tmp_path / "a.ckpt")
    io.save_checkpoint(make_state(2), tmp_path / "b.ckpt")
    io.teardown()
    assert service_client.status()["served"] == 2
    assert_state(io.load_checkpoint(tmp_path / "b.ckpt"), 2)
    assert io.last_loaded_tier == "memory"  # the newest one is kept in RAM ...
    assert_state(io.load_checkpoint(tmp_path / "a.ckpt"), 1)
    assert io.last_loaded_tier == "local"  # ... and memory=1 keeps only it
    io.save_checkpoint(make_state(3), tmp_path / "b.ckpt")  # the same name, another checkpoint
    io.teardown()
    assert_state(io.load_checkpoint(tmp_path / "b.ckpt"), 3)
    io.remove_checkpoint(tmp_path / "b.ckpt")  # Lightning's retention: the image goes too
    with pytest.raises(ckptio.CheckpointNotFoundError):
        io.load_checkpoint(tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match="FastCheckpointIO"):
        ckptio.AsyncCheckpointIO(ckptio.TorchCheckpointIO(), memory=1)


def test_a_stopped_service_never_hangs_the_trainer(service_dir, tmp_path):
    """A service that stops (SIGSTOP, a debugger, a frozen cgroup) rather than
    dies: the save handed to it is written by the trainer after
    STOPPED_GRACE_S, and later saves neither wait for it nor stall."""
    ckptio.async_save(make_state(1, 16), tmp_path / "warm.pt").result()
    (pid,) = service_pids(service_dir)
    state = make_state(2)
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match="stopped"):  # from the save queue's thread
            handle = ckptio.async_save(state, tmp_path / "b.pt")
            assert handle.stall_seconds < 1  # handed over: the message fits the socket's buffer
            handle.result(timeout=60)
        waited = time.monotonic() - start
        assert service_client.STOPPED_GRACE_S <= waited < service_client.STOPPED_GRACE_S + 10
        assert_state(ckptio.load(tmp_path / "b.pt"), 2)
        for step in (3, 4):  # while it stays stopped, saves are written here at once
            later = ckptio.async_save(make_state(step), tmp_path / f"s{step}.pt")
            assert later.stall_seconds < 1
            later.result(timeout=30)
            assert_state(ckptio.load(tmp_path / f"s{step}.pt"), step)
    finally:
        os.kill(pid, signal.SIGCONT)
    _wait_until(lambda: not service_pids(service_dir), 30, "the continued service to finish and exit when idle")
    assert_state(ckptio.load(tmp_path / "b.pt"), 2)  # whichever wrote it last, it is whole


def test_a_service_that_cannot_start_costs_one_wait_not_one_per_save(service_dir, tmp_path, monkeypatch):
    """Another process holds the service directory's lock without serving it
    (a stuck service, a stale mount): the first save waits START_TIMEOUT_S for
    a socket that never comes, warns, and writes in-process; later saves do
    not wait again."""
    monkeypatch.setattr(service_client, "START_TIMEOUT_S", 2.0)
    service_dir.mkdir(mode=0o700)
    holder = open(service_dir / "service.lock", "w")
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.warns(RuntimeWarning, match="did not start"):
            first = ckptio.async_save(make_state(1), tmp_path / "a.pt")
        assert 2.0 <= first.stall_seconds < 6.0
        first.result(timeout=30)
        later = ckptio.async_save(make_state(2), tmp_path / "b.pt")
        assert later.stall_seconds < 1.0
        later.result(timeout=30)
        assert_state(ckptio.load(tmp_path / "a.pt"), 1)
        assert_state(ckptio.load(tmp_path / "b.pt"), 2)
    finally:
        holder.close()
