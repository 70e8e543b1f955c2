"""ckptio's plugins in the real Lightning Trainer and Fabric, both packages."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ckptio
from ckptio import AsyncCheckpointIO, FastCheckpointIO, TorchCheckpointIO
from ckptio.background import reset
from lightning_models import lightning_namespace, make_model_class, trainer_kwargs

pytest.importorskip("lightning")
NAMESPACES = ["lightning", "pytorch_lightning"]


@pytest.fixture(autouse=True)
def drained():
    reset()
    yield
    reset()


def _fit(pl, tmp_path, io, max_steps=8, ckpt_path=None, **checkpoint_kwargs):
    Model = make_model_class(pl)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), **checkpoint_kwargs)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps, callbacks=[checkpoint], plugins=[io]))
    model = Model()
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model, checkpoint


@pytest.mark.parametrize("ns", NAMESPACES)
def test_top_k_every_step_leaves_exactly_the_expected_files(tmp_path, ns):
    pl = lightning_namespace(ns)
    trainer, model, _ = _fit(pl, tmp_path, AsyncCheckpointIO(), max_steps=8,
                             save_top_k=1, every_n_train_steps=1, save_last=True)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert files == ["epoch=0-step=8.ckpt", "last.ckpt"], files
    for name in files:
        ckpt = ckptio.load(tmp_path / "ckpt" / name, weights_only=False)
        assert ckpt["global_step"] == 8
        assert torch.equal(ckpt["state_dict"]["layer.weight"], model.layer.weight.detach())
        assert torch.load(tmp_path / "ckpt" / name, weights_only=False)["global_step"] == 8


@pytest.mark.parametrize("ns", NAMESPACES)
def test_save_last_link(tmp_path, ns):
    pl = lightning_namespace(ns)
    _fit(pl, tmp_path, AsyncCheckpointIO(), max_steps=6, save_top_k=1, every_n_train_steps=1, save_last="link")
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_symlink()
    assert ckptio.load(last, weights_only=False)["global_step"] == 6
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch=0-step=6.ckpt", "last.ckpt"]


@pytest.mark.parametrize("ns", NAMESPACES)
def test_resume_continues_with_identical_weights(tmp_path, ns):
    pl = lightning_namespace(ns)
    io = AsyncCheckpointIO()
    _, first, _ = _fit(pl, tmp_path, io, max_steps=6, every_n_train_steps=3, save_last=True)
    saved = {k: v.clone() for k, v in first.state_dict().items()}

    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, module):
            seen["step"] = trainer.global_step
            seen["weights"] = {k: v.clone() for k, v in module.state_dict().items()}

    Model = make_model_class(pl)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=10, callbacks=[Probe()], plugins=[io]))
    trainer.fit(Model(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert seen["step"] == 6 and trainer.global_step == 10
    for k, v in saved.items():
        assert torch.equal(seen["weights"][k], v), k


@pytest.mark.parametrize("ns", NAMESPACES)
def test_strategy_checkpoint_io_path(tmp_path, ns):
    pl = lightning_namespace(ns)
    io = AsyncCheckpointIO()
    strategy = pl.strategies.SingleDeviceStrategy(device=torch.device("cpu"), checkpoint_io=io)
    Model = make_model_class(pl)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=5, callbacks=[checkpoint], strategy=strategy))
    trainer.fit(Model())
    assert trainer.strategy.checkpoint_io is io
    assert ckptio.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 5


@pytest.mark.parametrize("ns", NAMESPACES)
def test_async_over_torch_checkpoint_io(tmp_path, ns):
    pl = lightning_namespace(ns)
    io = AsyncCheckpointIO(checkpoint_io=TorchCheckpointIO())
    trainer, model, checkpoint = _fit(pl, tmp_path, io, max_steps=6, save_top_k=1, every_n_train_steps=2)
    assert os.listdir(tmp_path / "ckpt") == ["epoch=0-step=6.ckpt"]
    ckpt = torch.load(tmp_path / "ckpt" / "epoch=0-step=6.ckpt", weights_only=False)
    assert torch.equal(ckpt["state_dict"]["layer.weight"], model.layer.weight.detach())


@pytest.mark.parametrize("ns", NAMESPACES)
def test_test_with_ckpt_path_and_several_fits(tmp_path, ns):
    pl = lightning_namespace(ns)
    io = FastCheckpointIO()
    Model = make_model_class(pl)
    model = Model()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, callbacks=[checkpoint], plugins=[io]))
    trainer.fit(model)
    trainer.fit_loop.epoch_loop.max_steps = 8
    trainer.fit(model)  # a second fit on the same plugin, after its teardown
    results = trainer.test(model, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)
    assert "test_loss" in results[0]
    assert ckptio.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 8


def test_plugins_are_lightning_checkpoint_io_for_both_packages():
    from lightning.fabric.plugins.io import CheckpointIO as LCheckpointIO
    from lightning.fabric.plugins.io import XLACheckpointIO as LXLA
    from lightning_fabric.plugins.io import CheckpointIO as PLCheckpointIO

    for plugin in (FastCheckpointIO(), TorchCheckpointIO(), AsyncCheckpointIO()):
        assert isinstance(plugin, LCheckpointIO) and isinstance(plugin, PLCheckpointIO)
    assert issubclass(ckptio.XLACheckpointIO, LXLA)


def test_metrics_callback_logs_save_costs(tmp_path):
    import lightning.pytorch as pl
    from ckptio.lightning import CheckpointMetrics

    Model = make_model_class(pl)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    logger = pl.loggers.CSVLogger(str(tmp_path / "logs"))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, callbacks=[checkpoint, CheckpointMetrics()],
                                          plugins=[AsyncCheckpointIO()], logger=logger, log_every_n_steps=1))
    trainer.fit(Model())
    metrics = open(os.path.join(logger.log_dir, "metrics.csv")).read()
    for column in ("ckpt/stall_s", "ckpt/write_s", "ckpt/GBps"):
        assert column in metrics.splitlines()[0]


def test_fabric_save_load_round_trip(tmp_path):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, plugins=[AsyncCheckpointIO()])
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    fabric.save(tmp_path / "f.ckpt", {"model": model, "optimizer": optimizer, "step": 3})
    restored = torch.nn.Linear(8, 8)
    state = {"model": restored, "step": 0}
    remainder = fabric.load(tmp_path / "f.ckpt", state)
    assert state["step"] == 3 and "optimizer" in remainder
    assert torch.equal(restored.weight, model.module.weight if hasattr(model, "module") else model.weight)


FABRIC_EXIT = textwrap.dedent(
    """
    import sys, torch, ckptio
    from lightning.fabric import Fabric
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[ckptio.AsyncCheckpointIO()])
    model = fabric.setup(torch.nn.Linear(2048, 2048))
    fabric.save(sys.argv[1], {"model": model, "step": 7})
    # exits at once: Fabric never calls teardown
    """
)


def test_fabric_script_exiting_right_after_save_leaves_a_complete_file(tmp_path):
    script = tmp_path / "fabric_exit.py"
    script.write_text(FABRIC_EXIT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "f.ckpt")], check=True, timeout=300)
    state = ckptio.load(tmp_path / "f.ckpt")
    assert state["step"] == 7 and state["model"]["weight"].shape == (2048, 2048)


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, json, torch
    sys.path.insert(0, {tests!r})
    import ckptio
    from lightning_models import lightning_namespace, make_model_class, trainer_kwargs
    pl = lightning_namespace("lightning")


    class Probe(pl.Callback):
        # Runs in every rank's process (also under ddp_spawn).
        def __init__(self, out, resume):
            self.out, self.resume = out, resume

        def on_train_start(self, trainer, module):
            self.start = trainer.global_step
            self.weight = module.layer.weight.detach().clone()

        def on_train_end(self, trainer, module):
            if not self.resume:
                return
            saved = ckptio.load(os.path.join(self.out, "weight_at_4.pt"))
            with open(os.path.join(self.out, f"rank{{trainer.global_rank}}.json"), "w") as f:
                json.dump({{"start": self.start, "end": trainer.global_step,
                           "same": bool(torch.equal(self.weight, saved))}}, f)


    def main():
        out, strategy, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
        Model = make_model_class(pl)
        ckpt_dir = os.path.join(out, "ckpt")
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=2,
                                                  save_top_k=1)
        trainer = pl.Trainer(**trainer_kwargs(out, max_steps=8 if resume else 4, devices=2, strategy=strategy,
                                              callbacks=[checkpoint, Probe(out, resume)],
                                              plugins=[ckptio.AsyncCheckpointIO()]))
        trainer.fit(Model(), ckpt_path=os.path.join(ckpt_dir, "last.ckpt") if resume else None)
        if not resume and trainer.global_rank == 0:
            ckpt = ckptio.load(os.path.join(ckpt_dir, "last.ckpt"), weights_only=False)
            ckptio.save(ckpt["state_dict"]["layer.weight"], os.path.join(out, "weight_at_4.pt"))


    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_process_ddp_saves_async_and_every_rank_resumes(tmp_path, strategy):
    import json

    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for phase in ("first", "resume"):
        subprocess.run([sys.executable, str(script), str(tmp_path), strategy, phase], check=True, timeout=600,
                       env=env, cwd=str(tmp_path))
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {"start": 4, "end": 8, "same": True}, (rank, seen)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert files == ["epoch=0-step=8.ckpt", "last.ckpt"], files


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("wrap", [False, True])
def test_resume_in_place_reads_into_the_modules_own_tensors(tmp_path, ns, wrap):
    from ckptio.lightning import ResumeInPlace

    pl = lightning_namespace(ns)
    io = AsyncCheckpointIO(FastCheckpointIO()) if wrap else FastCheckpointIO()
    _, first, _ = _fit(pl, tmp_path, io, max_steps=6, every_n_train_steps=3, save_last=True)
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    seen = {}

    class Probe(pl.Callback):
        def on_load_checkpoint(self, trainer, module, checkpoint):
            # The checkpoint's tensors are the module's own memory already.
            own = {k: v.data_ptr() for k, v in module.state_dict().items()}
            seen["in_place"] = {k: checkpoint["state_dict"][k].data_ptr() == own[k] for k in own}
            seen["optimizer_states"] = len(checkpoint["optimizer_states"])

        def on_train_start(self, trainer, module):
            seen["step"] = trainer.global_step
            seen["weights"] = {k: v.clone() for k, v in module.state_dict().items()}

    Model = make_model_class(pl)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=10, callbacks=[ResumeInPlace(ns), Probe()],
                                          plugins=[io]))
    trainer.fit(Model(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert seen["in_place"] and all(seen["in_place"].values()), seen["in_place"]
    assert seen["optimizer_states"] == 1
    assert seen["step"] == 6 and trainer.global_step == 10
    for k, v in saved.items():
        assert torch.equal(seen["weights"][k], v), k
    assert _plugin_target(io) is None  # the Trainer's teardown let go of the module


def _plugin_target(io):
    return getattr(io, "checkpoint_io", io).load_target
