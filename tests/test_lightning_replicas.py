"""Lightning DDP with replicas (ckptio.lightning.DDPStrategy(replicas=1)):
rank 0's checkpoints, written by ckptio's AsyncCheckpointIO(memory=2), also
in rank 1's node's memory tier. 2 real processes (gloo), each rank a "node"
with its own checkpoint service."""

import os
import shutil

import pytest
import torch
from conftest import run_fit_script, service_pids


def _run(*args):
    return run_fit_script("ddp_replica_fit.py", *args)


def _images(service_directory):
    found = []
    for folder, _, names in os.walk(os.path.join(service_directory, "memory")):
        found += [n for n in names if n.endswith(".ckpt")]
    return sorted(found)


def test_the_loss_of_rank_0s_node_resumes_from_its_partners_replica(tmp_path, monkeypatch):
    """Node 0 is lost after the fit: its service SIGKILLed, its RAM and the
    checkpoint file (its local disk) deleted. The resume serves rank 0 from
    node 1's replica, received over gloo and CRC-checked, rank 1 from its
    node's RAM; both restore the state at the end of the fit exactly."""
    monkeypatch.setenv("CKPTIO_SERVICE_IDLE_S", "2")
    monkeypatch.setenv("CKPTIO_MEMORY_KEEP_S", "120")  # kept between the runs, however slow they are
    try:
        _run("fit", tmp_path, tmp_path / "fit.pt")
        newest = tmp_path / "checkpoints" / "step=5.ckpt"
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step=3.ckpt", "step=5.ckpt"]
        for node in (0, 1):  # rank 0's own images, and rank 1's node's replicas of them
            assert _images(tmp_path / f"node{node}") == ["step=3.ckpt", "step=5.ckpt"], node
        fit = torch.load(tmp_path / "fit.pt")

        for pid in service_pids(tmp_path / "node0"):
            os.kill(pid, 9)
        shutil.rmtree(tmp_path / "node0")
        newest.unlink()
        _run("resume", tmp_path, tmp_path / "resumed.pt", newest)
        resumed = torch.load(tmp_path / "resumed.pt")
        assert [(tmp_path / f"resumed.pt.tier{r}").read_text() for r in (0, 1)] == ["partner", "memory"]
        assert resumed["step"] == fit["step"] == 6
        for key in fit["model"]:
            assert torch.equal(resumed["model"][key], fit["model"][key]), key
        for a, b in zip(resumed["optimizer"]["state"].values(), fit["optimizer"]["state"].values()):
            assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        for pid in service_pids(tmp_path, under=True):
            os.kill(pid, 9)


def test_replicas_need_a_memory_tier_and_a_process_group(tmp_path, monkeypatch):
    import ckptio.lightning
    from ckptio.plugins import AsyncCheckpointIO, FastCheckpointIO

    for plugin in (FastCheckpointIO(), AsyncCheckpointIO()):  # no memory tier: nowhere to keep a replica
        strategy = ckptio.lightning.DDPStrategy(replicas=1)
        strategy.checkpoint_io = plugin
        with pytest.raises(ValueError, match="AsyncCheckpointIO with memory >= 1"):
            strategy.save_checkpoint({"w": torch.ones(2)}, tmp_path / "x.ckpt")
        assert not (tmp_path / "x.ckpt").exists()
    with pytest.raises(ValueError, match="replicas must be 0 or 1"):
        ckptio.lightning.DDPStrategy(replicas=2)
    with pytest.raises(ValueError, match="replicas=1 needs memory >= 1"):
        ckptio.lightning.ModelParallelStrategy(replicas=1)
    with pytest.raises(ValueError, match="torch.distributed"):  # one process: no partner to replicate to
        ckptio.lightning.ModelParallelStrategy(memory=1, replicas=1).save_checkpoint(
            {"state_dict": {"w": torch.ones(2)}, "optimizer_states": []}, tmp_path / "sharded")
    assert not (tmp_path / "sharded").exists()
    monkeypatch.setenv("CKPTIO_REPLICA_TIMEOUT_S", "soon")
    with pytest.raises(ckptio.ConfigError, match="CKPTIO_REPLICA_TIMEOUT_S"):
        ckptio.lightning.DDPStrategy(replicas=1)
