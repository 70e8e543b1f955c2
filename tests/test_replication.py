"""Replicas in a partner node's memory (CheckpointManager(replicas=1)):
4 real gloo ranks as 2 nodes, each node its own checkpoint service, memory
tier and local directory (tests/replica_cases.py). A node lost whole (its
service SIGKILLed, its memory tier and local checkpoints deleted) resumes
every rank at the newest step, the lost ranks from their partners'
replicas, every tensor identical; both nodes lost, from the remote tier."""

import json
import os
import shutil
import signal

import dcp_cases
import replica_cases
from conftest import service_pids


def _lose_node(root, node):
    for pid in service_pids(root / f"node{node}" / "service"):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root / f"node{node}")


def _resume(root, name):
    out = root / name
    out.mkdir()
    dcp_cases.run(replica_cases.resume, replica_cases.WORLD, str(root), str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(replica_cases.WORLD)]


def test_a_lost_node_resumes_from_its_partners_memory_and_both_lost_from_the_remote_tier(tmp_path):
    root = tmp_path / "job"
    try:
        dcp_cases.run(replica_cases.train, replica_cases.WORLD, str(root))
        _lose_node(root, 0)
        ranks = _resume(root, "one_lost")
        assert [r["step"] for r in ranks] == [3, 3, 3, 3] and all(r["exact"] for r in ranks), ranks
        assert [r["tier"] for r in ranks] == ["partner", "partner", "memory", "memory"], ranks

        _lose_node(root, 0)
        _lose_node(root, 1)
        ranks = _resume(root, "both_lost")
        assert [r["step"] for r in ranks] == [3, 3, 3, 3] and all(r["exact"] for r in ranks), ranks
        assert [r["tier"] for r in ranks] == ["remote"] * 4, ranks
    finally:
        for node in (0, 1):
            for pid in service_pids(root / f"node{node}" / "service"):
                os.kill(pid, signal.SIGKILL)
