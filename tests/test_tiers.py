"""Two-tier checkpoints: local disk first, then object storage (a real S3 API
server: moto's, started here), and resuming from whichever is newest and whole."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import ckptio

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from s3_server import s3, s3_behind_proxy  # noqa: E402,F401 (fixtures)

REMOTE = "s3://ckpts/run"


def make_state(step, n=1 << 16):
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(n, generator=g), "b": torch.arange(64) + step}, "step": step}


def assert_state(loaded, step, n=1 << 16):
    want = make_state(step, n)
    assert loaded["step"] == step
    assert torch.equal(loaded["model"]["w"], want["model"]["w"])
    assert torch.equal(loaded["model"]["b"], want["model"]["b"])


def remote_pointer(fs):
    return fs.cat_file("ckpts/run/latest").decode().strip()


@pytest.mark.parametrize("async_save", [True, False])
def test_save_cycle_keeps_each_tier_and_commits_the_pointer_after_the_object(s3, tmp_path, async_save):
    fs, _ = s3
    manager = ckptio.CheckpointManager(tmp_path / "run", keep_last=2, remote=REMOTE, keep_remote=2,
                                       remote_every=2, async_save=async_save)
    copies = {}
    for step in range(1, 7):
        handle = manager.save(step, make_state(step))
        result = handle.result() if async_save else handle
        copies[step] = result.remote
        if result.remote is not None:
            if not async_save:  # a synchronous save returns once local; its copy settles in the lane
                assert result.remote.pending and not result.remote.committed
                assert manager.wait() == []
                assert manager.last_remote_step == step
            else:
                assert result.remote.committed
            assert result.remote.url == f"{REMOTE}/step_{step}.pt"
            assert remote_pointer(fs) == f"step_{step}.pt"  # moved only once the object was whole
            assert_state(ckptio.load(result.remote.url), step)
    manager.close()
    assert [s for s, c in copies.items() if c is not None] == [1, 3, 5]  # every 2nd save
    assert manager.steps() == [5, 6]          # keep_last=2
    assert manager.remote_steps() == [3, 5]   # keep_remote=2
    assert manager.last_durable_step == 6 and manager.last_remote_step == 5


def _two_tier_history(tmp_path):
    manager = ckptio.CheckpointManager(tmp_path / "run", keep_last=3, remote=REMOTE, keep_remote=3)
    for step in (10, 20, 30):
        manager.save(step, make_state(step))
    manager.close()


def test_a_wiped_local_directory_resumes_from_the_remote_tier(s3, tmp_path):
    _two_tier_history(tmp_path)
    shutil.rmtree(tmp_path / "run")  # the node, and its disk, are gone
    manager = ckptio.CheckpointManager(tmp_path / "run", keep_last=3, remote=REMOTE)
    assert manager.latest_step() == 30
    assert_state(manager.load_latest(), 30)
    assert manager.last_loaded == (30, "remote", f"{REMOTE}/step_30.pt")
    target = make_state(0)
    loaded = manager.load_latest(into=target)  # read into existing tensors, from the remote copy
    assert loaded["step"] == 30 and loaded["model"]["w"] is target["model"]["w"]
    assert_state(dict(target, step=30), 30)


def test_damaged_local_copies_fall_back_to_the_newest_whole_one(s3, tmp_path):
    _two_tier_history(tmp_path)
    run = tmp_path / "run"
    _flip_a_byte(run / "step_30.pt")
    manager = ckptio.CheckpointManager(run, keep_last=3, remote=REMOTE)
    with pytest.warns(UserWarning, match="skipping damaged"):
        assert_state(manager.load_latest(), 30)
    assert manager.last_loaded.tier == "remote"  # the same step, whole in the other tier
    s3[0].rm_file("ckpts/run/step_30.pt")
    with pytest.warns(UserWarning, match="skipping damaged"):
        assert_state(manager.load_latest(), 20)
    assert manager.last_loaded == (20, "local", str(run / "step_20.pt"))


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_file_url_tier_keeps_whole_committed_copies_in_another_directory(tmp_path):
    """A second tier on another disk or a shared mount (file://): copies are
    committed like local files, pruned to keep_remote, and serve a restart."""
    shared = tmp_path / "shared" / "run"
    url = f"file://{shared}"
    manager = ckptio.CheckpointManager(tmp_path / "run", keep_last=2, remote=url, keep_remote=2)
    for step in range(1, 5):
        result = manager.save(step, make_state(step)).result()
        assert result.remote.committed and result.remote.url == f"{url}/step_{step}.pt"
        assert (shared / "latest").read_text() == f"step_{step}.pt\n"  # moved once the copy was whole
        assert (shared / f"step_{step}.pt").read_bytes() == (tmp_path / "run" / f"step_{step}.pt").read_bytes()
    manager.close()
    assert sorted(os.listdir(shared)) == ["latest", "step_3.pt", "step_4.pt"]  # keep_remote=2, no temporaries

    shutil.rmtree(tmp_path / "run")  # the local disk is gone
    restarted = ckptio.CheckpointManager(tmp_path / "run", remote=url)
    assert_state(restarted.load_latest(), 4)
    assert restarted.last_loaded == (4, "remote", f"{url}/step_4.pt")


def test_a_file_url_tier_that_cannot_be_written_never_fails_the_local_save(tmp_path):
    (tmp_path / "not-a-directory").write_text("a file where the tier's directory should be")
    url = f"file://{tmp_path}/not-a-directory/run"
    manager = ckptio.CheckpointManager(tmp_path / "run", remote=url)
    with pytest.warns(RuntimeWarning, match="not-a-directory"):
        result = manager.save(1, make_state(1)).result()
        manager.wait()
    assert isinstance(result.remote.error, ckptio.CheckpointIOError) and url in str(result.remote.error)
    assert_state(ckptio.load(tmp_path / "run" / "step_1.pt"), 1)  # the local save stands
    with pytest.raises(ValueError, match="own directory"):
        ckptio.CheckpointManager(tmp_path / "run", remote=f"file://{tmp_path}/run/")


def test_a_remote_outage_mid_upload_leaves_local_saves_going_and_heals(s3_behind_proxy, tmp_path):
    fs, proxy = s3_behind_proxy
    n = 10 << 20  # 40 MiB: a multipart upload of three parts
    manager = ckptio.CheckpointManager(tmp_path / "run", keep_last=5, remote=REMOTE)
    manager.save(1, make_state(1, n)).result()
    assert remote_pointer(fs) == "step_1.pt"

    proxy.down_at = ("PUT", "partNumber=2")  # the server goes away mid-upload ...
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [manager.save(2, make_state(2, n)).result()]  # local saves go on: no exception
        assert proxy.down and proxy.down_at is None  # it went down at part 2, and stays down ...
        results.append(manager.save(3, make_state(3, n)).result())  # ... for the next save too
        manager.wait()
    assert [r.remote.committed for r in results] == [False, False]
    failures = [w for w in caught if issubclass(w.category, RuntimeWarning) and "failed" in str(w.message)]
    assert len(failures) == 2, [str(w.message) for w in caught]  # once per failed copy
    assert manager.last_durable_step == 3 and manager.steps() == [1, 2, 3]
    assert_state(ckptio.load(tmp_path / "run" / "step_3.pt"), 3, n)

    proxy.down = False  # the server is back
    fs.invalidate_cache()
    assert remote_pointer(fs) == "step_1.pt"  # never moved to a partial object
    assert_state(ckptio.load(f"{REMOTE}/step_1.pt"), 1, n)
    result = manager.save(4, make_state(4, n)).result()
    assert result.remote.committed
    fs.invalidate_cache()
    assert remote_pointer(fs) == "step_4.pt"
    assert_state(ckptio.load(f"{REMOTE}/step_4.pt"), 4, n)
    manager.close()


TWO_TIER_LOOP = """
import sys, torch, ckptio, fsspec
fsspec.config.conf["s3"] = {"endpoint_url": sys.argv[2], "key": "testing", "secret": "testing"}
sys.path.insert(0, sys.argv[3])
from test_tiers import make_state
manager = ckptio.CheckpointManager(sys.argv[1], keep_last=2, remote="s3://ckpts/run", keep_remote=2, remote_every=2)
step = (manager.latest_step() or 0) + 1
reported = None
while True:
    manager.save(step, make_state(step))
    if manager.last_durable_step != reported:
        reported = manager.last_durable_step
        print(reported, flush=True)
    step += 1
"""


@pytest.mark.slow
def test_sigkill_at_random_moments_of_a_two_tier_loop(s3, tmp_path):
    """Each run resumes where the last one got to and is killed at a random
    moment; load_latest must then give a whole checkpoint no older than the
    last one reported durable locally."""
    import fsspec

    endpoint = fsspec.config.conf["s3"]["endpoint_url"]
    rng = random.Random(14)
    run = str(tmp_path / "run")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    kills, newest_reported = 0, 0
    while kills < 20:
        proc = subprocess.Popen([sys.executable, "-c", TWO_TIER_LOOP, run, endpoint, tests], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env)
        first = proc.stdout.readline()  # running: it has made at least one save durable
        assert first.strip(), "the loop did not start"
        newest_reported = max(newest_reported, int(first))
        time.sleep(rng.uniform(0, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        newest_reported = max([newest_reported] + [int(line) for line in out.split()])
        kills += 1
        manager = ckptio.CheckpointManager(run, keep_last=2, remote=REMOTE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = manager.load_latest()
        assert loaded["step"] >= newest_reported, (kills, manager.last_loaded, newest_reported)
        assert_state(loaded, loaded["step"])
    assert newest_reported >= 20


@pytest.mark.parametrize("namespace", ["lightning", "pytorch_lightning"])
def test_lightning_two_tier_plugin_resumes_from_the_remote_copy(s3, tmp_path, namespace):
    pl = pytest.importorskip(namespace)
    if namespace == "lightning":
        pl = pl.pytorch
    from ckptio.lightning import CheckpointMetrics
    from lightning_models import make_model_class, trainer_kwargs

    fs, _ = s3
    Model = make_model_class(pl)
    logged = []

    class Recorder(pl.loggers.logger.Logger if hasattr(pl.loggers, "logger") else pl.loggers.Logger):
        name, version, experiment = "recorder", 0, None

        def log_metrics(self, metrics, step=None):
            logged.append(metrics)

        def log_hyperparams(self, *args, **kwargs):
            pass

    local = tmp_path / "ckpt"
    io = ckptio.AsyncCheckpointIO(remote="s3://ckpts/pl")
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(local), save_top_k=2, monitor="step", mode="max",
                                              every_n_train_steps=2)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, logger=Recorder(),
                                          callbacks=[checkpoint, CheckpointMetrics(namespace)], plugins=[io]))
    model = Model()
    trainer.fit(model)
    io.teardown()
    names = sorted(os.listdir(local))
    assert len(names) == 2  # top-2 locally ...
    assert sorted(n.rsplit("/", 1)[-1] for n in fs.ls("ckpts/pl", refresh=True) if n.endswith(".ckpt")) == names
    assert any("ckpt/remote_s" in m and m["ckpt/remote_ok"] == 1.0 for m in logged)  # ... and remotely

    newest = checkpoint.best_model_path
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    shutil.rmtree(local)  # the node is gone; resume with the same ckpt_path
    resumed = Model()
    io = ckptio.AsyncCheckpointIO(remote="s3://ckpts/pl")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, plugins=[io], enable_checkpointing=False))
    with pytest.warns(UserWarning, match="loading the remote copy"):
        trainer.fit(resumed, ckpt_path=newest)
    assert trainer.global_step == 6  # nothing left to train: the remote copy was the end of the run
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_the_cli_lists_each_tier_with_its_state(s3, tmp_path, capsys):
    from ckptio.cli import main

    _two_tier_history(tmp_path)
    run = tmp_path / "run"
    _flip_a_byte(run / "step_30.pt")
    os.remove(run / "step_10.pt")
    assert main(["list", str(run), "--remote", REMOTE]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines == [["step", "local", "remote", "note"], ["30", "damaged", "whole"], ["20", "whole", "whole"],
                     ["10", "-", "whole", "remote-only"]]


def test_the_two_tier_lightning_example_runs():
    example = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "lightning_two_tier.py")
    out = subprocess.run([sys.executable, example], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed epoch=0-step=16.ckpt from memory://two-tier after the local copy was wiped" in out.stdout
