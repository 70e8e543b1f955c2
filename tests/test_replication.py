"""Replicas in a partner node's memory (CheckpointManager(replicas=1)):
4 real gloo ranks as 2 nodes, each node its own checkpoint service, memory
tier and local directory (tests/replica_cases.py). A node lost whole (its
service SIGKILLed, its memory tier and local checkpoints deleted) resumes
every rank at the newest step, the lost ranks from their partners'
replicas, every tensor identical; both nodes lost, from the remote tier (a
local S3 server). The lost node's ranks are SIGKILLed once their saves are durable and
replicated."""

import json
import os
import shutil
import signal

import dcp_cases
import replica_cases
from conftest import service_pids
from s3_server import s3  # noqa: F401 (a fixture)


def _lose_node(root, node):
    for pid in service_pids(root / f"node{node}" / "service"):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root / f"node{node}")


def _train_then_kill_node(root, node):
    import torch.multiprocessing as mp

    context = mp.start_processes(replica_cases.train, args=(replica_cases.WORLD, dcp_cases.free_port(), str(root), node),
                                 nprocs=replica_cases.WORLD, start_method="spawn", join=False)
    for process in context.processes:
        process.join(300)
    codes = [p.exitcode for p in context.processes]
    assert codes == [-signal.SIGKILL if r // replica_cases.LOCAL == node else 0 for r in range(replica_cases.WORLD)]


def _replica_of(root, owner, holder_node):
    from ckptio.service.memory_tier import folder_for

    owner_directory = os.path.abspath(root / f"node{owner // replica_cases.LOCAL}" / "ckpt" / f"rank{owner}")
    folder = folder_for(str(root / f"node{holder_node}" / "service"), f"replica of rank {owner}: {owner_directory}",
                        "step_", ".pt")
    (replica,) = (e for e in os.scandir(folder) if e.name.startswith("step_"))
    return type(root)(replica.path)


def _resume(root, name):
    out = root / name
    out.mkdir()
    dcp_cases.run(replica_cases.resume, replica_cases.WORLD, str(root), str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(replica_cases.WORLD)]


def test_a_lost_node_resumes_from_its_partners_memory_and_both_lost_from_the_remote_tier(tmp_path, s3, monkeypatch):
    fs, _ = s3  # the remote tier: a local S3 server (moto), reached by the spawned ranks through fsspec's variables
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", fs.client_kwargs.get("endpoint_url") or fs.endpoint_url)
    monkeypatch.setenv("FSSPEC_S3_KEY", "testing")
    monkeypatch.setenv("FSSPEC_S3_SECRET", "testing")
    monkeypatch.setenv("REPLICA_REMOTE", "s3://ckpts/replicas")
    root = tmp_path / "job"
    try:
        _train_then_kill_node(root, 0)
        _lose_node(root, 0)
        ranks = _resume(root, "lost")
        assert [r["step"] for r in ranks] == [3, 3, 3, 3] and all(r["exact"] for r in ranks), ranks
        assert [r["tier"] for r in ranks] == ["partner", "partner", "memory", "memory"], ranks
        # Every rank recovers the newest step any rank holds: the remote tier (seconds to list on an object
        # store) is not listed.
        assert [r["listed_remote"] for r in ranks] == [0, 0, 0, 0], ranks

        _lose_node(root, 0)  # again, and now one of its ranks' replicas is damaged
        replica = _replica_of(root, owner=0, holder_node=1)  # rank 2 keeps rank 0's newest: damage it
        data = bytearray(replica.read_bytes())
        data[len(data) // 2] ^= 0xFF
        replica.write_bytes(bytes(data))
        ranks = _resume(root, "one_lost")
        assert [r["step"] for r in ranks] == [3, 3, 3, 3] and all(r["exact"] for r in ranks), ranks
        # rank 0: its replica is damaged, so the next tier (remote); rank 1: its partner's memory.
        assert [r["tier"] for r in ranks] == ["remote", "partner", "memory", "memory"], ranks
        assert all(r["listed_remote"] for r in ranks), ranks

        _lose_node(root, 0)
        _lose_node(root, 1)
        ranks = _resume(root, "both_lost")
        assert [r["step"] for r in ranks] == [3, 3, 3, 3] and all(r["exact"] for r in ranks), ranks
        assert [r["tier"] for r in ranks] == ["remote"] * 4, ranks
    finally:
        for node in (0, 1):
            for pid in service_pids(root / f"node{node}" / "service"):
                os.kill(pid, signal.SIGKILL)


def test_a_partner_gone_while_replicating_costs_a_warning_never_a_save(tmp_path):
    dcp_cases.run(replica_cases.partner_gone, 2, str(tmp_path), str(tmp_path))
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["steps"] == [1, 2, 3] and report["exact"], report
    assert len(report["warnings"]) == 1 and "rank 1" in report["warnings"][0], report  # said once, naming it
    assert report["seconds"] < 60, report  # within CKPTIO_REPLICA_TIMEOUT_S, not gloo's 30 minutes



def test_a_partner_that_hangs_costs_the_replica_timeout_never_a_save(tmp_path):
    import torch.multiprocessing as mp

    context = mp.start_processes(replica_cases.partner_hangs, args=(2, dcp_cases.free_port(), str(tmp_path),
                                                                    str(tmp_path)),
                                 nprocs=2, start_method="spawn", join=False)
    try:
        context.processes[0].join(120)
        assert context.processes[0].exitcode == 0
    finally:
        os.kill(context.processes[1].pid, signal.SIGKILL)  # stopped since step 1
        context.processes[1].join()
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["steps"] == [1, 2, 3] and report["exact"], report
    assert len(report["warnings"]) == 1 and "rank 1" in report["warnings"][0], report
    assert 4 < report["seconds"] < 60, report  # CKPTIO_REPLICA_TIMEOUT_S=5, not gloo's 30 minutes
    assert report["durable"] < 3, report  # the saves never waited for the hung partner


def test_bad_replica_settings_are_named(tmp_path, monkeypatch):
    import pytest

    import ckptio

    with pytest.raises(ValueError, match="replicas must be 0 or 1"):
        ckptio.CheckpointManager(tmp_path, replicas=2)
    with pytest.raises(ValueError, match="torch.distributed"):
        ckptio.CheckpointManager(tmp_path, replicas=1)  # no process group: nobody to replicate to
    monkeypatch.setenv("CKPTIO_REPLICA_TIMEOUT_S", "soon")
    with pytest.raises(ckptio.ConfigError, match="CKPTIO_REPLICA_TIMEOUT_S"):
        ckptio.CheckpointManager(tmp_path, replicas=1)


def test_plain_dcp_checkpoints_resume_a_lost_rank_from_its_partners_replica(tmp_path):
    """ckptio.dcp_replicas with dcp.save/dcp.load (tests/replica_cases.py
    dcp_checkpoints): a lost node's rank file comes from its partner's RAM,
    CRC-checked; a replica damaged in RAM is refused, the directory serves."""
    dcp_cases.run(replica_cases.dcp_checkpoints, 2, str(tmp_path), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r[step]["exact"] for r in ranks for step in ("1", "2")), ranks
    lost = ranks[1]
    assert lost["1"]["from_partner"] and lost["1"]["from_memory"] == ["__1_0.distcp"] and lost["1"]["from_disk"] == []
    assert not lost["2"]["from_partner"] and lost["2"]["from_disk"] == ["__1_0.distcp"]
    assert len(lost["2"]["warnings"]) == 1 and "damaged" in lost["2"]["warnings"][0]
    assert ranks[0]["1"]["from_memory"] == ["__0_0.distcp"] and not ranks[0]["1"]["from_partner"]
