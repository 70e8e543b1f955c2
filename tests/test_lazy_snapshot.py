"""Lazy snapshots: the file holds the state at the call, bit for bit, while
forward/backward (and, for buffers, their changes) go on during the copy.

Every test delays the background copies (ckptio._testing.delay_lazy_copies)
so the training steps after a save really run before the copy: a missing
barrier then shows as a wrong file, not as a rare race.
"""

import errno
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from torch import nn

import ckptio
from ckptio import AsyncCheckpointIO, FastCheckpointIO, TorchCheckpointIO
from ckptio._testing import delay_lazy_copies, inject_fault
from ckptio.background import reset
from ckptio.errors import CheckpointIOError, ConfigError
from conftest import assert_same

DELAY = 0.3  # seconds a lazy copy waits before it starts, in these tests


@pytest.fixture(autouse=True)
def fresh_async_state():
    reset()
    yield
    ckptio.wait_snapshots()
    reset()


def clone_tree(obj):
    """A deep copy in which every tensor is a clone: the state at this moment."""
    return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, obj)


OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam_foreach": lambda params: torch.optim.Adam(params, lr=1e-2, foreach=True),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
}


class Training:
    """A small model with BatchNorm (its running stats change in forward) and an optimizer."""

    def __init__(self, optimizer="adamw_fused", batchnorm=True, seed=0):
        torch.manual_seed(seed)
        layers = [nn.Linear(64, 64)] + ([nn.BatchNorm1d(64)] if batchnorm else []) + [nn.ReLU(), nn.Linear(64, 4)]
        self.model = nn.Sequential(*layers)
        self.optimizer = OPTIMIZERS[optimizer](self.model.parameters())
        self.data = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed + 1))

    def forward_backward(self):
        loss = self.model(self.data).square().mean()
        loss.backward()
        return loss

    def step(self, n=1):
        for _ in range(n):
            self.optimizer.zero_grad()
            self.forward_backward()
            self.optimizer.step()

    def state(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": 3}


def assert_file_holds(path, expected, live):
    """The file equals `expected`, and the live state has moved on since
    (else the test could not tell a late copy from a timely one)."""
    assert_same(torch.load(path, weights_only=True), expected)
    moved = [k for k, v in expected["model"].items() if not torch.equal(v, live["model"][k])]
    assert moved, "training did not change the state after the save: this test proves nothing"


def lazy_save_then(run, path, train, save=None):
    """Save `run`'s state lazily (with `save(state, path)` if given), call
    `train(handle)` while the copy is held back, then check that the file
    holds the state at the call."""
    expected = clone_tree(run.state())
    with delay_lazy_copies(DELAY):
        handle = (save or (lambda s, p: ckptio.async_save(s, p, snapshot="lazy")))(run.state(), path)
        assert handle.snapshot == "lazy"
        train(handle)
    handle.result(timeout=60)
    assert_file_holds(path, expected, run.state())


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_lazy_save_holds_the_state_at_the_call(tmp_path, optimizer):
    run = Training(optimizer)
    run.step(2)
    # forward changes BatchNorm's stats, the step the parameters and optimizer state
    lazy_save_then(run, tmp_path / "c.pt", lambda handle: run.step(2))


def test_gradient_accumulation_waits_only_at_the_step(tmp_path):
    run = Training("adam_foreach")
    run.step(1)

    def accumulate_then_step(handle):
        start = time.monotonic()
        for _ in range(3):
            run.forward_backward()  # several micro-batches before one step
        assert not handle.wait_snapshot(0), "forward/backward waited for the copy"
        assert time.monotonic() - start < DELAY
        run.optimizer.step()  # waits for the copy first
        assert handle.wait_snapshot(0)

    lazy_save_then(run, tmp_path / "c.pt", accumulate_then_step)


def test_a_save_before_any_step_is_eager(tmp_path):
    run = Training("sgd_momentum")
    expected = clone_tree(run.state())
    handle = ckptio.async_save(run.state(), tmp_path / "c.pt", snapshot="lazy")
    assert handle.snapshot == "eager"  # no optimizer of these parameters has stepped: nothing is left for later
    run.step(1)
    handle.result(timeout=60)
    assert_file_holds(tmp_path / "c.pt", expected, run.state())


def test_two_lazy_saves_back_to_back(tmp_path):
    run = Training("adamw_fused")
    run.step(1)
    first = clone_tree(run.state())
    with delay_lazy_copies(DELAY):
        h1 = ckptio.async_save(run.state(), tmp_path / "a.pt", snapshot="lazy")
        run.forward_backward()
        h2 = ckptio.async_save(run.state(), tmp_path / "b.pt", snapshot="lazy")  # waits for the first copy
        h3 = ckptio.async_save(run.state(), tmp_path / "a.pt", snapshot="lazy")  # the same path again
        run.step(2)
    for h in (h1, h2, h3):
        h.result(timeout=60)
    # Between the saves only forward/backward ran: BatchNorm's stats moved, parameters did not.
    assert_file_holds(tmp_path / "b.pt", clone_tree(torch.load(tmp_path / "a.pt")), run.state())
    second = torch.load(tmp_path / "b.pt")
    for k in first["model"]:
        if "running" in k or "num_batches" in k:
            assert not torch.equal(first["model"][k], second["model"][k]), k
        else:
            assert torch.equal(first["model"][k], second["model"][k]), k


def test_a_failed_lazy_copy_is_raised_once_and_keeps_the_previous_file(tmp_path):
    run = Training("adam_foreach", batchnorm=False)  # only parameters and optimizer state: all copied lazily
    run.step(1)
    path = tmp_path / "c.pt"
    ckptio.save(run.state(), path)
    before = path.read_bytes()
    run.step(1)
    with inject_fault("copy_error", errno=errno.EIO):
        handle = ckptio.async_save(run.state(), path, snapshot="lazy")
        assert handle.snapshot == "lazy"
        run.step(1)  # the barrier returns although the copy failed
    with pytest.raises(CheckpointIOError, match="snapshot copy") as failure:
        ckptio.wait()
    assert failure.value.errno == errno.EIO
    ckptio.wait()  # raised once
    assert path.read_bytes() == before
    assert [n for n in os.listdir(tmp_path) if n != "c.pt"] == []
    expected = clone_tree(run.state())
    with delay_lazy_copies(DELAY):
        handle = ckptio.async_save(run.state(), path, snapshot="lazy")  # the next one works
        run.step(1)
    handle.result(timeout=60)
    assert_file_holds(path, expected, run.state())


def test_the_failure_reaches_the_handle_first(tmp_path):
    run = Training("adam_foreach", batchnorm=False)
    run.step(1)
    with inject_fault("copy_error", errno=errno.EIO):
        handle = ckptio.async_save(run.state(), tmp_path / "c.pt", snapshot="lazy")
        ckptio.wait_snapshots()  # the copy runs while the fault is armed, however late its thread starts
    assert isinstance(handle.exception(timeout=60), CheckpointIOError)
    ckptio.wait()  # seen by its handle: not raised again
    assert not (tmp_path / "c.pt").exists()


def test_a_storage_resized_before_its_lazy_copy_fails_the_save(tmp_path):
    # FSDP frees parameters with storage().resize_(0) between steps: a lazy
    # copy must not read the old address (freed) or past the new end.
    run = Training("adam_foreach", batchnorm=False)
    run.step(1)
    path = tmp_path / "c.pt"
    ckptio.save(run.state(), path)
    before = path.read_bytes()
    weight = run.model[0].weight
    with delay_lazy_copies(DELAY):
        handle = ckptio.async_save(run.state(), path, snapshot="lazy")
        weight.untyped_storage().resize_(0)  # no optimizer step, no barrier: against the contract
    with pytest.raises(RuntimeError, match="resized .* before its lazy snapshot copy"):
        handle.result(timeout=60)
    assert path.read_bytes() == before


class PerturbFirst(torch.optim.Optimizer):
    """Changes the parameters before calling its closure (as SAM does), so the
    wait cannot be moved after the closure for it."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        for p in params:
            p.add_(0.5)
        with torch.enable_grad():
            loss = closure()
        for p in params:
            p.sub_(0.5).sub_(0.1 * p.grad)
        return loss


def test_an_optimizer_that_changes_parameters_before_its_closure_waits_first(tmp_path):
    run = Training("sgd_momentum")
    run.optimizer = PerturbFirst(run.model.parameters())

    def closure():
        run.optimizer.zero_grad()
        return run.forward_backward()

    run.optimizer.step(closure)
    lazy_save_then(run, tmp_path / "c.pt", lambda handle: run.optimizer.step(closure))


def test_torchs_optimizers_wait_after_their_closure_so_forward_backward_overlap(tmp_path):
    run = Training("adam_foreach")
    run.step(1)
    seen = {}

    def step_with_closure(handle):
        def closure():
            seen["copy done when forward started"] = handle.wait_snapshot(0)
            run.optimizer.zero_grad()
            return run.forward_backward()

        run.optimizer.step(closure)

    lazy_save_then(run, tmp_path / "c.pt", step_with_closure)
    assert seen == {"copy done when forward started": False}


def test_lbfgs_calls_its_closure_many_times(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(32, 1)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=5)
    data = torch.randn(64, 32)

    def closure():
        optimizer.zero_grad()
        loss = model(data).square().mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    expected = clone_tree(state)
    with delay_lazy_copies(DELAY):
        handle = ckptio.async_save(state, tmp_path / "c.pt", snapshot="lazy")
        optimizer.step(closure)
    handle.result(timeout=60)
    assert_file_holds(tmp_path / "c.pt", expected, {"model": model.state_dict()})


def test_without_a_barrier_the_copy_is_really_late(tmp_path):
    """The contract's other side, shown so the tests above are known to be
    able to fail: a parameter changed outside optimizer.step() before the
    copy ran is in the file."""
    run = Training("sgd_momentum")
    run.step(1)
    weight = run.model[0].weight
    with delay_lazy_copies(DELAY):
        handle = ckptio.async_save(run.state(), tmp_path / "c.pt", snapshot="lazy")
        with torch.no_grad():
            weight.fill_(7.0)  # no optimizer step, no ckptio call: nothing waits
    handle.result(timeout=60)
    assert torch.equal(torch.load(tmp_path / "c.pt")["model"]["0.weight"], torch.full_like(weight, 7.0))


@pytest.mark.parametrize("barrier", ["handle.wait_snapshot", "ckptio.wait_snapshots", "ckptio.verify"])
def test_explicit_barriers(tmp_path, barrier):
    run = Training("sgd_momentum")
    run.step(1)
    ckptio.save({"x": torch.ones(1)}, tmp_path / "other.pt")
    expected = clone_tree(run.state())
    with delay_lazy_copies(DELAY):
        handle = ckptio.async_save(run.state(), tmp_path / "c.pt", snapshot="lazy")
        if barrier == "handle.wait_snapshot":
            assert handle.wait_snapshot()
        elif barrier == "ckptio.wait_snapshots":
            ckptio.wait_snapshots()
        else:
            ckptio.verify(tmp_path / "other.pt")
        with torch.no_grad():
            for p in run.model.parameters():
                p.fill_(7.0)  # allowed once the barrier has returned
    handle.result(timeout=60)
    assert_file_holds(tmp_path / "c.pt", expected, run.state())


@pytest.mark.parametrize("base", ["fast", "torch", "plugin"])
def test_async_checkpoint_io_lazy_over_each_backend(tmp_path, base):
    class OwnPlugin(ckptio.CheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            torch.save(checkpoint, path)

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            return torch.load(path)

        def remove_checkpoint(self, path):
            os.remove(path)

    plugin = {"fast": FastCheckpointIO, "torch": TorchCheckpointIO, "plugin": OwnPlugin}[base]()
    io = AsyncCheckpointIO(plugin, snapshot="lazy")
    run = Training("adamw_fused")
    run.step(1)
    lazy_save_then(run, tmp_path / "c.pt", lambda handle: run.step(2), save=io.save_checkpoint)
    io.teardown()
    assert not [t for t in threading.enumerate() if t.name.startswith("ckptio-")]


def test_snapshot_mode_from_the_environment_and_bad_values(tmp_path, monkeypatch):
    run = Training("sgd_momentum")
    run.step(1)
    monkeypatch.setenv("CKPTIO_SNAPSHOT", "lazy")
    assert ckptio.async_save(run.state(), tmp_path / "a.pt").snapshot == "lazy"
    assert ckptio.async_save(run.state(), tmp_path / "b.pt", snapshot="eager").snapshot == "eager"
    ckptio.wait()
    monkeypatch.setenv("CKPTIO_SNAPSHOT", "sometimes")
    with pytest.raises(ConfigError, match="CKPTIO_SNAPSHOT='sometimes'.*eager, lazy"):
        ckptio.async_save(run.state(), tmp_path / "c.pt")
    with pytest.raises(ValueError, match="snapshot='late'"):
        ckptio.async_save(run.state(), tmp_path / "c.pt", snapshot="late")
    with pytest.raises(ValueError, match="snapshot='late'"):
        AsyncCheckpointIO(snapshot="late")
    assert not (tmp_path / "c.pt").exists()


def test_lazy_saves_keep_memory_to_two_slots(tmp_path):
    """Ten lazy saves of a 128 MiB state, each overlapping training: the
    process's peak resident memory grows by the two staging slots and some
    of a training step's transients (~35 MiB measured), never by a third copy (+128)."""
    script = textwrap.dedent(
        f"""
        import resource, torch, ckptio
        from torch import nn
        model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(16)])  # 64 MiB of parameters
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # + 64 MiB of momentum
        x = torch.randn(8, 1024)
        def step():
            opt.zero_grad(); model(x).sum().backward(); opt.step()
        step(); step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for i in range(10):
            ckptio.async_save({{"model": model.state_dict(), "opt": opt.state_dict()}},
                              r"{tmp_path}/c%d.pt" % (i % 2), snapshot="lazy")
            step()
        ckptio.wait()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    growth_mib = int(out.stdout.split()[-1])
    assert growth_mib <= 2 * 128 + 96, f"peak resident memory grew by {growth_mib} MiB for 128 MiB states"


# --- the real Trainer ----------------------------------------------------------

def _lightning_module_class(pl, manual: bool):
    class WithBatchNorm(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            loss = self.net(batch).pow(2).mean()
            if not manual:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.05, fused=True)

        def train_dataloader(self):
            data = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
            return torch.utils.data.DataLoader(data, batch_size=8)

    return WithBatchNorm


class RecordingAsyncIO(AsyncCheckpointIO):
    """Keeps a clone of every checkpoint as the Trainer hands it over."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.expected, self.snapshots = {}, []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.expected[str(path)] = clone_tree({k: checkpoint[k] for k in ("state_dict", "optimizer_states")})
        handle = super().save_checkpoint(checkpoint, path, storage_options)
        self.snapshots.append(handle.snapshot)
        return handle


@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
@pytest.mark.parametrize("ns", ["lightning", "pytorch_lightning"])
@pytest.mark.parametrize("mode", ["automatic", "manual", "accumulate"])
def test_trainer_lazy_checkpoints_hold_the_state_at_each_save(tmp_path, ns, mode):
    from lightning_models import lightning_namespace, trainer_kwargs

    pl = lightning_namespace(ns)
    model = _lightning_module_class(pl, manual=mode == "manual")()
    io = RecordingAsyncIO(snapshot="lazy")
    every = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=5, callbacks=[every], plugins=[io],
                                          accumulate_grad_batches=2 if mode == "accumulate" else 1))
    with delay_lazy_copies(0.1):
        trainer.fit(model)
    assert len(io.expected) == 5
    assert "lazy" in io.snapshots, io.snapshots  # the first save may be eager: no optimizer had stepped yet
    for path, expected in io.expected.items():
        saved = ckptio.load(path, weights_only=False)
        assert_same({k: saved[k] for k in expected}, expected, path)
    first, last = (ckptio.load(p, weights_only=False)["state_dict"] for p in sorted(io.expected)[:: len(io.expected) - 1])
    assert not torch.equal(first["net.0.weight"], last["net.0.weight"])
    assert not [t for t in threading.enumerate() if t.name.startswith("ckptio-")]
