"""Preemption with real signals: queued saves become durable before a
signalled process ends, and a save issued from Lightning's SLURM handler is
durable before that handler requeues the job (and the job is killed)."""

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

import ckptio
from ckptio.background import reset
from ckptio.preemption import in_signal_handler
from ckptio.save_queue import get_queue

TESTS = os.path.dirname(os.path.abspath(__file__))
BIG = 48 << 20  # float32 elements: 192 MiB, a write that takes a while


@pytest.fixture(autouse=True)
def drained():
    reset()
    yield
    reset()


def test_in_signal_handler_sees_handlers_of_every_shape():
    seen = []

    class Compose:  # as Lightning's _HandlersCompose holds its handlers
        def __init__(self, handlers):
            self.signal_handlers = handlers

        def __call__(self, signum, frame):
            for h in self.signal_handlers:
                h(signum, frame)

    def handler(signum, frame):
        seen.append(in_signal_handler())

    previous = signal.signal(signal.SIGUSR2, Compose([handler]))
    try:
        assert not in_signal_handler()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [True]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_queued_saves_are_durable_before_the_previous_handler_runs(tmp_path):
    path = str(tmp_path / "model.pt")
    at_previous = []

    def previous(signum, frame):  # e.g. the training loop's own "stop now" handler
        at_previous.append((os.path.exists(path), get_queue().pending()))

    old = signal.signal(signal.SIGUSR2, previous)
    try:
        with ckptio.on_preemption(signals=[signal.SIGUSR2], deadline_s=120):
            state = {"w": torch.randn(BIG // 4), "step": 3}
            ckptio.async_save(state, path)
            os.kill(os.getpid(), signal.SIGUSR2)
        assert at_previous == [(True, 0)]
        assert signal.getsignal(signal.SIGUSR2) is previous  # restored on leaving the block
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="deadline_s"):
        ckptio.on_preemption(deadline_s=-1)


CUSTOM_LOOP = """
import sys, time, torch, ckptio
ckptio.on_preemption(deadline_s=120)
state = {"w": torch.randn(%d, generator=torch.Generator().manual_seed(5)), "step": 7}
ckptio.async_save(state, sys.argv[1])
print("queued", flush=True)
time.sleep(120)  # training goes on; the scheduler's SIGTERM comes now
""" % (BIG,)


def test_sigterm_in_a_custom_loop_waits_for_the_queued_save(tmp_path):
    path = tmp_path / "model.pt"
    proc = subprocess.Popen([sys.executable, "-c", CUSTOM_LOOP, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "queued"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, err  # still ended by the signal, as a scheduler expects
    assert "checkpoints durable" in err
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 7
    assert torch.equal(loaded["w"], torch.randn(BIG, generator=torch.Generator().manual_seed(5)))


LIGHTNING_SLURM = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch, ckptio
from lightning_models import lightning_namespace, make_model_class, trainer_kwargs

pl = lightning_namespace(sys.argv[1])
out = sys.argv[2]


class Big(make_model_class(pl)):
    def __init__(self):
        super().__init__()
        self.register_buffer("big", torch.randn({big}, generator=torch.Generator().manual_seed(9)))


class Preempted(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's --signal=USR1@90


import importlib
environments = importlib.import_module(pl.__name__ + ".plugins.environments")
env = environments.SLURMEnvironment(auto_requeue=True)
trainer = pl.Trainer(**trainer_kwargs(out, max_steps=1000, callbacks=[Preempted()], enable_checkpointing=False,
                                      plugins=[env, ckptio.AsyncCheckpointIO()]))
trainer.fit(Big())
print("not requeued", flush=True)
"""

# SLURM's `scontrol requeue`, stubbed: record the call, then do what SLURM
# does to a requeued job, at its fastest: kill it.
SCONTROL = """#!/bin/sh
echo "$@" >> "{log}"
kill -KILL $PPID
"""


@pytest.mark.parametrize("namespace", ["lightning", "pytorch_lightning"])
def test_lightning_slurm_requeue_save_is_durable_before_the_job_is_killed(tmp_path, namespace):
    pytest.importorskip(namespace)
    bin_dir, out, log = tmp_path / "bin", tmp_path / "run", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(SCONTROL.format(log=log))
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NTASKS="1",
               SLURM_NTASKS_PER_NODE="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
               SLURM_JOB_NAME="train", SLURM_NODELIST="localhost")
    script = LIGHTNING_SLURM.format(tests=TESTS, big=BIG)
    proc = subprocess.run([sys.executable, "-c", script, namespace, str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]
    saved = torch.load(out / "hpc_ckpt_1.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    expected = torch.randn(BIG, generator=torch.Generator().manual_seed(9))
    assert torch.equal(saved["state_dict"]["big"], expected)


@pytest.mark.parametrize("namespace", ["lightning", "pytorch_lightning"])
def test_under_lightning_sigterm_drains_and_lets_the_trainer_stop_gracefully(tmp_path, namespace):
    """As Lightning's own test_sigterm_handler_can_be_added: a handler set
    before the Trainer runs inside Lightning's; here that handler is
    on_preemption's, which drains the queue and leaves the stop to Lightning
    (SIGTERMException), instead of ending the process itself."""
    pl = pytest.importorskip(namespace)
    if namespace == "lightning":
        pl = pl.pytorch
    from lightning_models import make_model_class, trainer_kwargs

    path = str(tmp_path / "queued.pt")
    state = {"w": torch.randn(BIG // 4)}

    class Model(make_model_class(pl)):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                ckptio.async_save(state, path)
                os.kill(os.getpid(), signal.SIGTERM)
            return super().training_step(batch, batch_idx)

    guard = ckptio.on_preemption(signals=[signal.SIGTERM], deadline_s=120)
    try:
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=10, enable_checkpointing=False))
        with pytest.raises(SystemExit):  # Lightning's SIGTERMException
            trainer.fit(Model())
        assert trainer.received_sigterm
        assert get_queue().pending() == 0
        assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])
    finally:
        guard.restore()
