"""Checkpoints at s3:// URLs, against a real S3 API server on localhost (moto's
standalone server, the one s3fs's own tests use), started here."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import ckptio

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto")

from s3_server import s3, s3_behind_proxy  # noqa: E402,F401 (fixtures)


def _state(step, n=1 << 16):
    return {"w": torch.full((n,), float(step)), "b": torch.arange(100) + step, "step": step}


def test_sync_and_async_round_trips(s3):
    fs, _ = s3
    ckptio.save(_state(1), "s3://ckpts/a.pt")
    assert ckptio.load("s3://ckpts/a.pt")["step"] == 1
    assert ckptio.verify("s3://ckpts/a.pt").path == "s3://ckpts/a.pt"
    handle = ckptio.async_save(_state(2), "s3://ckpts/b.pt")
    assert handle.result(timeout=120).bytes == fs.size("ckpts/b.pt")
    out = ckptio.load("s3://ckpts/b.pt")
    assert out["step"] == 2 and torch.equal(out["b"], torch.arange(100) + 2)
    # The object is a plain torch.save file: torch reads it too.
    with fs.open("ckpts/b.pt", "rb") as f:
        assert torch.load(f, weights_only=True)["step"] == 2


def test_plugins_take_urls(s3):
    fs, _ = s3
    io = ckptio.AsyncCheckpointIO()
    io.save_checkpoint(_state(3), "s3://ckpts/p.pt")
    io.save_checkpoint(_state(4), "s3://ckpts/q.pt")
    io.remove_checkpoint("s3://ckpts/p.pt")
    io.teardown()
    assert not fs.exists("ckpts/p.pt")
    assert io.load_checkpoint("s3://ckpts/q.pt")["step"] == 4
    torch_io = ckptio.TorchCheckpointIO()
    torch_io.save_checkpoint(_state(5), "s3://ckpts/t.pt")
    assert torch_io.load_checkpoint("s3://ckpts/t.pt")["step"] == 5


def test_object_appears_only_when_the_upload_completes(s3):
    fs, _ = s3
    state = _state(6, n=24 << 20)  # 96 MiB: several parts
    seen_early = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen_early.append((fs.exists("ckpts/big.pt"), time.monotonic()))
            fs.invalidate_cache()
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        ckptio.save(state, "s3://ckpts/big.pt")
        returned = time.monotonic()
    finally:
        done.set()
        watcher.join()
    # A look that ended just before save returned may have reached the server
    # after the upload completed (a moment earlier): those do not count.
    before = [seen for seen, at in seen_early if at < returned - 0.5]
    assert before and not any(before)
    assert ckptio.load("s3://ckpts/big.pt")["step"] == 6


def test_upload_interrupted_by_a_stopped_server_raises(s3):
    fs, server = s3
    state = _state(7, n=64 << 20)  # 256 MiB
    threading.Timer(0.5, server.kill).start()
    with pytest.raises(ckptio.CheckpointIOError) as info:
        ckptio.save(state, "s3://ckpts/cut.pt")
    assert "s3://ckpts/cut.pt" in str(info.value)


BOUNDED = """
import os, sys, torch, ckptio, fsspec
fsspec.config.conf["s3"] = {"endpoint_url": sys.argv[1], "key": "testing", "secret": "testing"}
state = {f"t{i}": torch.ones(64 << 20, dtype=torch.uint8) for i in range(16)}  # 1 GiB
def rss_kb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
def hwm_kb():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
base = rss_kb()
ckptio.save(state, "s3://ckpts/huge.pt")
print(base, hwm_kb())
"""


@pytest.mark.slow
def test_a_1gib_checkpoint_uploads_with_bounded_memory(s3):
    fs, _ = s3
    endpoint = fs.client_kwargs.get("endpoint_url") if hasattr(fs, "client_kwargs") else None
    endpoint = endpoint or fs.endpoint_url
    out = subprocess.run([sys.executable, "-c", BOUNDED, endpoint], capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing"))
    assert out.returncode == 0, out.stderr[-3000:]
    base_kb, peak_kb = map(int, out.stdout.split())
    growth = (peak_kb - base_kb) * 1024
    assert growth < 256 << 20, f"peak memory grew by {growth >> 20} MiB for a 1 GiB upload"
    assert fs.size("ckpts/huge.pt") > 1 << 30


def _pending_uploads(fs) -> list:
    return fs.call_s3("list_multipart_uploads", Bucket="ckpts").get("Uploads", [])


def _failed_save_over(fs, proxy, *refusals):
    import gc

    ckptio.save(_state(1), "s3://ckpts/model.pt")
    before = fs.cat("ckpts/model.pt")
    for method, path_has, times in refusals:
        proxy.refuse(method, path_has, times)
    with pytest.raises(ckptio.CheckpointIOError) as info:
        ckptio.save(_state(2, n=10 << 20), "s3://ckpts/model.pt")  # 40 MiB: three 16 MiB parts
    assert "s3://ckpts/model.pt" in str(info.value)
    gc.collect()  # what would run a file object's __del__, with the server reachable again
    fs.invalidate_cache()
    assert fs.cat("ckpts/model.pt") == before, "the failed upload completed over the previous object"
    return proxy.refused


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_refused_part_leaves_the_previous_object_and_no_upload(s3_behind_proxy):
    fs, proxy = s3_behind_proxy
    refused = _failed_save_over(fs, proxy, ("PUT", "partNumber=2", 1))
    assert len(refused) == 1
    assert _pending_uploads(fs) == []  # aborted, not left behind


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_refused_abort_is_retried_and_the_upload_can_never_complete(s3_behind_proxy):
    fs, proxy = s3_behind_proxy
    refused = _failed_save_over(fs, proxy, ("PUT", "partNumber=2", 1), ("DELETE", "uploadId=", 1))
    assert [r.split()[0] for r in refused] == ["PUT", "DELETE"]
    assert _pending_uploads(fs) == []  # the second abort went through


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_an_upload_that_cannot_be_aborted_stays_incomplete(s3_behind_proxy):
    fs, proxy = s3_behind_proxy
    refused = _failed_save_over(fs, proxy, ("PUT", "partNumber=2", 1), ("DELETE", "uploadId=", 100))
    assert sum(r.startswith("DELETE") for r in refused) == 3  # every attempt refused
    assert len(_pending_uploads(fs)) == 1  # never completed, invisible to readers
