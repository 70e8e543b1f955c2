"""Shared fixtures: a state that covers every dtype and structure torch.save
handles, bit-exact comparison, and filesystems that fail on purpose."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from collections import OrderedDict

import pytest
import torch


def make_everything_state() -> dict:
    """Every dtype, views sharing a storage, non-contiguous tensors,
    Parameters, 0-dim and empty tensors, nested containers and plain values."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=g)
    state = OrderedDict()
    float_dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    for dt in float_dtypes:
        state[f"float_{dt}"] = torch.randn(17, 5, generator=g).to(dt)
    for dt in [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]:
        state[f"float8_{dt}"] = torch.randn(33, generator=g).to(dt)
    for dt in [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]:
        state[f"int_{dt}"] = torch.randint(-100 if dt != torch.uint8 else 0, 100, (9, 3), generator=g).to(dt)
    for dt in [torch.uint16, torch.uint32, torch.uint64]:
        state[f"uint_{dt}"] = torch.randint(0, 1000, (11,), generator=g).to(dt)
    state["complex64"] = torch.randn(7, dtype=torch.complex64, generator=g)
    state["complex128"] = torch.randn(7, dtype=torch.complex128, generator=g)
    state["bool"] = torch.rand(23, generator=g) > 0.5
    state["view_a"] = base[10:20]
    state["view_b"] = base[500:].view(25, 20)
    state["non_contiguous"] = torch.randn(8, 6, generator=g).t()
    state["strided"] = torch.randn(40, generator=g)[::3]
    state["param"] = torch.nn.Parameter(torch.randn(4, 4, generator=g))
    state["frozen_param"] = torch.nn.Parameter(torch.randn(3, generator=g), requires_grad=False)
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.empty(0)
    state["empty_2d"] = torch.empty(0, 7, dtype=torch.int64)
    state["nested"] = {
        "list": [torch.arange(5), 1, 2.5, "text", None, True],
        "tuple": (torch.ones(2, dtype=torch.bfloat16), (b"bytes", 7)),
        "ordered": OrderedDict(z=torch.zeros(3), a={"deep": [torch.full((2,), 9)]}),
    }
    state["step"] = 1234
    state["lr"] = 3e-4
    state["name"] = "model-v1"
    return state


def assert_same(a, b, path="obj"):
    """Deep equality with tensors compared bit for bit (dtype, shape, stride, bytes)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: {type(b)} is not a tensor"
        assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} vs {b.shape}"
        assert a.stride() == b.stride(), f"{path}: stride {a.stride()} vs {b.stride()}"
        assert a.requires_grad == b.requires_grad, f"{path}: requires_grad"
        if a.device.type != "meta" and b.device.type != "meta":
            assert _bits(a) == _bits(b), f"{path}: bytes differ"
        return
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _bits(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.numel() == 0:
        return b""
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else \
        t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture
def everything_state():
    return make_everything_state()


@pytest.fixture
def fresh_engine(monkeypatch):
    """Drop the process-wide engine so env vars set by the test take effect,
    and again afterwards so later tests get the defaults."""
    from ckptio._engine import reset_engine

    reset_engine()
    yield
    reset_engine()


def _run(cmd) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


@contextmanager
def _mounted(mnt, fstype, *options):
    """Mount a fresh `fstype` at `mnt` for the block; skip where mounting is not permitted."""
    mnt.mkdir()
    if not _run(["mount", "-t", fstype, *options, fstype, str(mnt)]):
        pytest.skip(f"cannot mount a {fstype} here (needs root / CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        _run(["umount", "-l", str(mnt)])


@pytest.fixture
def small_filesystem(tmp_path):
    """A 2 MiB tmpfs mounted for the test: writes past that fail with ENOSPC."""
    with _mounted(tmp_path / "small_fs", "tmpfs", "-o", "size=2m") as mnt:
        yield mnt


@pytest.fixture
def no_direct_io_filesystem(tmp_path):
    """A ramfs mounted for the test: it refuses O_DIRECT (EINVAL), like some
    network and older tmpfs filesystems."""
    with _mounted(tmp_path / "ramfs", "ramfs") as mnt:
        yield mnt


@pytest.fixture
def make_read_only(tmp_path):
    """Returns a function that makes a directory refuse new files: chmod for
    ordinary users; for root (who ignores modes) the immutable attribute."""
    locked = []

    def lock(directory):
        directory = str(directory)
        if os.geteuid() != 0:
            os.chmod(directory, 0o555)
        elif not _run(["chattr", "+i", directory]):
            pytest.skip("cannot make a directory read-only as root here (chattr +i failed)")
        locked.append(directory)

    yield lock
    for d in locked:
        if os.geteuid() == 0:
            _run(["chattr", "-i", d])
        else:
            os.chmod(d, 0o755)


def leftover_temporaries(directory) -> list:
    return [n for n in os.listdir(directory) if ".ckptio-tmp-" in n]


def service_pids(directory, under: bool = False) -> list:
    """Pids of the checkpoint services (ckptio.service.server) serving
    `directory` or, `under`, any directory inside it: found by their command
    line, which names the directory they serve."""
    prefix = str(directory).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        served = any(a == prefix or (under and a.startswith(prefix + b"/")) for a in args)
        if served and any(b"ckptio.service.server" in a for a in args):
            pids.append(int(entry))
    return pids


def run_fit_script(script: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the 2-process Lightning fit scripts here (sharded_fit.py,
    ddp_replica_fit.py) with `args`; assert it succeeded."""
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, os.path.join(here, script), *map(str, args)], cwd=here,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
