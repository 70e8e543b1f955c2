"""What Lightning users rely on from a CheckpointIO plugin, beyond ckptio's
own backends: their own plugins under ckptio's AsyncCheckpointIO, the Trainer's
default checkpointing into a directory nobody made, SLURM's "hpc" resume
after a killed save, pickling a Trainer, file:// paths and Lightning's
not-found message. Each runs the real Trainer of both Lightning packages."""

import importlib
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import ckptio
from ckptio import AsyncCheckpointIO, FastCheckpointIO, TorchCheckpointIO
from ckptio.background import reset
from conftest import leftover_temporaries
from lightning_models import lightning_namespace, make_model_class, trainer_kwargs

pytest.importorskip("lightning")
NAMESPACES = ["lightning", "pytorch_lightning"]
FABRIC_IO = {"lightning": "lightning.fabric.plugins.io", "pytorch_lightning": "lightning_fabric.plugins.io"}


@pytest.fixture(autouse=True)
def drained():
    reset()
    yield
    reset()


# --- users' own plugins under ckptio's AsyncCheckpointIO ---------------------

def _user_plugin_class(base):
    """A plugin as a user writes one: torch.save plus a key of its own, slow
    enough that training moves on while it writes."""

    class UserCheckpointIO(base):
        def __init__(self):  # like many user plugins, no super().__init__()
            self.saved_paths = []

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            time.sleep(0.05)
            checkpoint = dict(checkpoint, written_by="user plugin")
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            torch.save(checkpoint, path)
            self.saved_paths.append(os.fspath(path))

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            return torch.load(path, map_location="cpu", weights_only=False)

        def remove_checkpoint(self, path):
            if os.path.exists(path):
                os.remove(path)

    return UserCheckpointIO


def _bases(ns):
    return {"lightning_base": importlib.import_module(FABRIC_IO[ns]).CheckpointIO, "ckptio_base": ckptio.CheckpointIO}


class _WeightsAtSave:
    """Records the weights each checkpoint was made from (the Trainer's
    on_save_checkpoint hook runs while the checkpoint dict is built)."""

    def __init__(self, pl):
        outer = self
        self.by_step = {}

        class Callback(pl.Callback):
            def on_save_checkpoint(self, trainer, pl_module, checkpoint):
                outer.by_step[trainer.global_step] = pl_module.layer.weight.detach().clone()

        self.callback = Callback()


@pytest.mark.parametrize("base", ["lightning_base", "ckptio_base"])
@pytest.mark.parametrize("ns", NAMESPACES)
def test_users_plugin_under_async_io_writes_every_checkpoint_as_of_its_step(tmp_path, ns, base):
    pl = lightning_namespace(ns)
    user = _user_plugin_class(_bases(ns)[base])()
    weights = _WeightsAtSave(pl)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, callbacks=[checkpoint, weights.callback],
                                          plugins=[AsyncCheckpointIO(user)]))
    trainer.fit(make_model_class(pl)())

    assert len(user.saved_paths) == 4  # the user's own save_checkpoint wrote each one
    for step in (2, 4, 6, 8):
        ckpt = torch.load(tmp_path / "ckpt" / f"epoch=0-step={step}.ckpt", weights_only=False)
        assert ckpt["written_by"] == "user plugin"
        assert ckpt["global_step"] == step
        # training went on while the plugin slept: the file still holds that step's weights
        assert torch.equal(ckpt["state_dict"]["layer.weight"], weights.by_step[step])
    # resuming goes through the user's load_checkpoint
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=10, plugins=[AsyncCheckpointIO(user)]))
    trainer.fit(make_model_class(pl)(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=8.ckpt"))
    assert trainer.global_step == 10


@pytest.mark.parametrize("base", ["lightning_base", "ckptio_base"])
def test_mutating_tensors_after_the_call_does_not_change_what_the_plugin_writes(tmp_path, base):
    user = _user_plugin_class(_bases("lightning")[base])()
    io = AsyncCheckpointIO(checkpoint_io=user)
    w, nested = torch.zeros(1000), {"list": [torch.arange(5)], "step": 1}
    io.save_checkpoint({"w": w, "nested": nested}, path=str(tmp_path / "a.ckpt"))
    w.add_(1)
    nested["list"][0].mul_(0)
    nested["step"] = 2  # plain values are snapshotted too
    io.teardown()
    out = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert torch.equal(out["w"], torch.zeros(1000))
    assert torch.equal(out["nested"]["list"][0], torch.arange(5))
    assert out["nested"]["step"] == 1


def test_a_plugin_may_keep_what_it_was_given_after_later_saves(tmp_path):
    """The copy a plugin receives is its own, not the reusable staging slot."""

    class Keeper(ckptio.CheckpointIO):
        def __init__(self):
            super().__init__()
            self.kept = []

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            self.kept.append(checkpoint)

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            raise NotImplementedError

        def remove_checkpoint(self, path):
            pass

    keeper = Keeper()
    io = AsyncCheckpointIO(keeper)
    for step in range(4):
        io.save_checkpoint({"w": torch.full((4096,), float(step))}, str(tmp_path / f"{step}.ckpt"))
    io.teardown()
    assert [float(c["w"][0]) for c in keeper.kept] == [0.0, 1.0, 2.0, 3.0]
    assert all(bool((c["w"] == c["w"][0]).all()) for c in keeper.kept)


@pytest.mark.parametrize("backend", [FastCheckpointIO, TorchCheckpointIO])
@pytest.mark.parametrize("ns", NAMESPACES)
def test_a_subclass_overriding_save_checkpoint_keeps_its_behaviour(tmp_path, ns, backend):
    class Tagged(backend):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            checkpoint["tag"] = "from the subclass"
            super().save_checkpoint(checkpoint, path, storage_options)

    pl = lightning_namespace(ns)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_top_k=-1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, callbacks=[checkpoint],
                                          plugins=[AsyncCheckpointIO(Tagged())]))
    trainer.fit(make_model_class(pl)())
    for step in (3, 6):
        path = tmp_path / "ckpt" / f"epoch=0-step={step}.ckpt"
        assert ckptio.load(path, weights_only=False)["tag"] == "from the subclass"
        assert torch.load(path, weights_only=False)["global_step"] == step


# --- the Trainer's default checkpointing ----------------------------------------

@pytest.mark.parametrize("make_io", [TorchCheckpointIO, FastCheckpointIO, lambda: AsyncCheckpointIO(TorchCheckpointIO())],
                         ids=["torch", "fast", "async_torch"])
@pytest.mark.parametrize("ns", NAMESPACES)
def test_default_checkpointing_creates_its_directory(tmp_path, ns, make_io):
    pl = lightning_namespace(ns)
    root = tmp_path / "run"  # does not exist yet; neither does run/checkpoints
    trainer = pl.Trainer(**trainer_kwargs(root, max_epochs=2, limit_train_batches=3, plugins=[make_io()]))
    trainer.fit(make_model_class(pl)())
    files = os.listdir(root / "checkpoints")
    assert files == ["epoch=1-step=6.ckpt"], files
    assert torch.load(root / "checkpoints" / files[0], weights_only=False)["global_step"] == 6


# --- SLURM / HPC resume after a save killed mid-write -----------------------------

KILLED_SAVE = textwrap.dedent(
    """
    import sys, torch, ckptio
    backend, path = sys.argv[1], sys.argv[2]
    io = ckptio.FastCheckpointIO() if backend == "fast" else ckptio.TorchCheckpointIO()
    print("ready", flush=True)
    io.save_checkpoint({"w": torch.ones(256 << 20 >> 2), "global_step": 999}, path)  # 256 MiB: killed before done
    """
)


def _kill_while_writing(backend: str, path: str) -> None:
    """Start a save of `path` in a child and SIGKILL it once its temporary file exists."""
    directory = os.path.dirname(path)
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, backend, path], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not leftover_temporaries(directory):
            assert child.poll() is None, "the save finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.0005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


@pytest.mark.parametrize("backend", ["fast", "torch"])
@pytest.mark.parametrize("ns", NAMESPACES)
def test_hpc_resume_after_a_killed_save_uses_the_last_whole_checkpoint(tmp_path, ns, backend):
    pl = lightning_namespace(ns)
    io = FastCheckpointIO() if backend == "fast" else TorchCheckpointIO()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, enable_checkpointing=False, plugins=[io]))
    trainer.fit(make_model_class(pl)())
    trainer.save_checkpoint(str(tmp_path / "hpc_ckpt_1.ckpt"))  # what Lightning's SLURM handler does

    _kill_while_writing(backend, str(tmp_path / "hpc_ckpt_2.ckpt"))
    assert leftover_temporaries(tmp_path), "the kill should leave the writer's temporary behind"
    assert not (tmp_path / "hpc_ckpt_2.ckpt").exists()
    assert [n for n in os.listdir(tmp_path) if "hpc_ckpt_" in n] == ["hpc_ckpt_1.ckpt"]

    started_at = []

    class RecordStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            started_at.append(trainer.global_step)

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, enable_checkpointing=False, plugins=[io],
                                          callbacks=[RecordStart()]))
    trainer.fit(make_model_class(pl)(), ckpt_path="hpc")
    assert started_at == [4] and trainer.global_step == 6


# --- pickling, file:// URLs, the not-found message -----------------------------------

@pytest.mark.parametrize("ns", NAMESPACES)
def test_a_trainer_pickles_after_async_saves(tmp_path, ns):
    pl = lightning_namespace(ns)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, callbacks=[checkpoint], plugins=[AsyncCheckpointIO()]))
    trainer.fit(make_model_class(pl)())
    assert trainer.strategy.checkpoint_io.last_handle is not None
    copy = pickle.loads(pickle.dumps(trainer.strategy.checkpoint_io))
    assert isinstance(copy, AsyncCheckpointIO) and isinstance(copy.checkpoint_io, FastCheckpointIO)
    pickle.loads(pickle.dumps(trainer))
    # the unpickled plugin still saves
    copy.save_checkpoint({"w": torch.ones(3)}, str(tmp_path / "after.ckpt"))
    copy.teardown()
    assert torch.equal(torch.load(tmp_path / "after.ckpt")["w"], torch.ones(3))


PLUGINS = {"fast": FastCheckpointIO, "torch": TorchCheckpointIO, "async": AsyncCheckpointIO,
           "async_torch": lambda: AsyncCheckpointIO(TorchCheckpointIO())}


@pytest.mark.parametrize("name", PLUGINS)
def test_file_urls_name_local_paths(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    io = PLUGINS[name]()
    path = tmp_path / "sub" / "a.ckpt"
    url = "file://" + str(path)
    io.save_checkpoint({"w": torch.arange(10)}, url)
    io.teardown()
    assert torch.equal(torch.load(path)["w"], torch.arange(10))
    assert torch.equal(io.load_checkpoint(url)["w"], torch.arange(10))
    assert sorted(os.listdir(tmp_path)) == ["sub"]  # no relative "file:" directory
    io.remove_checkpoint(url)
    assert not path.exists()


@pytest.mark.parametrize("name", PLUGINS)
def test_a_missing_checkpoint_raises_lightnings_message(tmp_path, name):
    io = PLUGINS[name]()
    missing = str(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match=re.escape(f"Checkpoint file not found: {missing}")) as e:
        io.load_checkpoint(missing)
    assert isinstance(e.value, ckptio.CheckpointNotFoundError)
    assert str(e.value) == f"Checkpoint file not found: {missing}"
    with pytest.raises(ckptio.CheckpointNotFoundError, match="Checkpoint file not found"):
        ckptio.load(missing)


# --- what Lightning's own suite checks besides ---------------------------------------

def test_teardown_leaves_no_thread_behind(tmp_path):
    """Lightning's test suite fails any test that leaves a thread running."""
    import threading

    before = set(threading.enumerate())
    io = AsyncCheckpointIO(TorchCheckpointIO())
    for step in range(3):
        io.save_checkpoint({"w": torch.full((1000,), float(step))}, str(tmp_path / "a.ckpt"))
    io.teardown()
    assert set(threading.enumerate()) - before == set()
    assert float(torch.load(tmp_path / "a.ckpt")["w"][0]) == 2.0
    # and the plugin goes on working after teardown (ddp_spawn saves after it)
    io.save_checkpoint({"w": torch.ones(3)}, str(tmp_path / "b.ckpt"))
    io.teardown()
    assert set(threading.enumerate()) - before == set()
    assert torch.equal(torch.load(tmp_path / "b.ckpt")["w"], torch.ones(3))


def test_nested_async_plugins_keep_their_structure_and_save_once(tmp_path):
    class Counting(TorchCheckpointIO):
        calls = 0

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            Counting.calls += 1
            super().save_checkpoint(checkpoint, path, storage_options)

    base = Counting()
    inner = AsyncCheckpointIO(base)
    outer = AsyncCheckpointIO(inner)
    assert outer.checkpoint_io is inner and inner.checkpoint_io is base
    assert outer._base_checkpoint_io_configured is True
    outer.save_checkpoint({"w": torch.arange(4)}, str(tmp_path / "n.ckpt"))
    outer.teardown()
    assert Counting.calls == 1
    assert torch.equal(torch.load(tmp_path / "n.ckpt")["w"], torch.arange(4))


@pytest.mark.parametrize("ns", NAMESPACES)
def test_a_nested_default_async_plugin_has_a_torch_checkpoint_io_base_on_a_trainer(tmp_path, ns):
    """Lightning's test_multi_wrapped_checkpoint_io_initialization: the inner
    plugin's base is a TorchCheckpointIO once a Trainer holds it (ckptio's
    default base, its engine, writes the same files and counts as one)."""
    pl = lightning_namespace(ns)
    torch_io = importlib.import_module(FABRIC_IO[ns]).TorchCheckpointIO
    inner = AsyncCheckpointIO()
    outer = AsyncCheckpointIO(inner)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1), plugins=[outer])
    assert trainer.strategy.checkpoint_io is outer and outer.checkpoint_io is inner
    assert isinstance(inner.checkpoint_io, torch_io) and isinstance(TorchCheckpointIO(), torch_io)
    assert isinstance(inner.checkpoint_io, TorchCheckpointIO)  # ckptio's too: the harness may swap either in
    assert outer._base_checkpoint_io_configured and inner._base_checkpoint_io_configured
    trainer.fit(make_model_class(pl)())
    (saved,) = list(tmp_path.rglob("*.ckpt"))
    assert torch.load(saved, weights_only=True)["global_step"] == 1


@pytest.mark.parametrize("ns", NAMESPACES)
def test_storage_options_error_names_the_plugin_the_user_passed(tmp_path, ns):
    pl = lightning_namespace(ns)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, enable_checkpointing=False,
                                          plugins=[AsyncCheckpointIO()]))
    trainer.fit(make_model_class(pl)())
    with pytest.raises(TypeError, match="not supported for `AsyncCheckpointIO`"):
        trainer.save_checkpoint(str(tmp_path / "x.ckpt"), storage_options={"a": 1})
    assert not (tmp_path / "x.ckpt").exists()
