"""4 gloo ranks as 2 "nodes" for tests/test_replication.py: ranks 0-1 on
node 0, ranks 2-3 on node 1, each node with its own checkpoint service
(socket directory and memory tier) and local checkpoint directory, and a
shared remote tier (REPLICA_REMOTE: the test's S3 server; else file://). LOCAL_WORLD_SIZE=2: rank r's partner is
(r + 2) % 4, on the other node."""

import json
import os
import signal
import sys

import torch
import torch.distributed as dist

import ckptio

WORLD, LOCAL = 4, 2
STEPS = (1, 2, 3)


def state_of(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {"w": torch.randn(1 << 18, generator=g), "b": torch.arange(8) + 10 * step + rank, "step": step}


def manager_of(rank, root):
    node = rank // LOCAL
    os.environ.update(LOCAL_WORLD_SIZE=str(LOCAL), CKPTIO_SERVICE_DIR=f"{root}/node{node}/service",
                      CKPTIO_SERVICE_IDLE_S="2", CKPTIO_MEMORY_KEEP_S="300")
    remote = os.environ.get("REPLICA_REMOTE") or f"file://{root}/remote"  # the test's S3 server (moto)
    return ckptio.CheckpointManager(f"{root}/node{node}/ckpt/rank{rank}", keep_last=2, memory=2, replicas=1,
                                    remote=f"{remote}/rank{rank}")


def train(rank, world, port, root, killed_node):
    """Save STEPS; then node `killed_node`'s ranks are SIGKILLed, the others leave."""
    _init(rank, world, port)
    manager = manager_of(rank, root)
    for step in STEPS:
        manager.save(step, state_of(rank, step))
    manager.close()  # every save durable, replicated, copied
    dist.barrier()
    sys.stdout.flush()
    if rank // LOCAL == killed_node:
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0)


def resume(rank, world, port, root, out):
    _init(rank, world, port)
    manager = manager_of(rank, root)
    listings = []
    list_remote = manager._remote_steps_in_time
    manager._remote_steps_in_time = lambda: listings.append(1) or list_remote()  # counts the remote listings
    state = manager.load_latest()
    expected = state_of(rank, manager.last_loaded.step)
    exact = state["step"] == expected["step"] and all(torch.equal(state[k], expected[k]) for k in ("w", "b"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"step": manager.last_loaded.step, "tier": manager.last_loaded.tier, "exact": exact,
                   "listed_remote": len(listings)}, f)
    manager.close()
    _finish()


def partner_gone(rank, world, port, root, out):
    """Rank 1 vanishes after step 1 (no goodbye): see _partner_lost."""
    _partner_lost(rank, world, port, root, out, lambda: os._exit(0))


def partner_hangs(rank, world, port, root, out):
    """Rank 1 stops after step 1 (SIGSTOP: alive, never answering; the test
    SIGKILLs it once rank 0 is done): see _partner_lost."""
    _partner_lost(rank, world, port, root, out, lambda: os.kill(os.getpid(), signal.SIGSTOP))


def _partner_lost(rank, world, port, root, out, lose):
    """2 ranks, partners of each other; after step 1 rank 1 runs lose().
    Rank 0's saves of steps 2 and 3 are durable all the same, without
    waiting for the partner (replication gives up on its own thread, at the
    latest after CKPTIO_REPLICA_TIMEOUT_S=5 s, not gloo's 30 minutes), and
    the failed replication is said once: rank0.json."""
    import time
    import warnings

    _init(rank, world, port)
    os.environ.update(LOCAL_WORLD_SIZE="1", CKPTIO_SERVICE_DIR=f"{root}/node{rank}/service", CKPTIO_REPLICA_TIMEOUT_S="5")
    manager = ckptio.CheckpointManager(f"{root}/node{rank}/ckpt", keep_last=3, replicas=1)
    manager.save(1, state_of(rank, 1))
    manager.wait()
    dist.barrier()
    if rank == 1:
        lose()
    time.sleep(0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.monotonic()
        for step in (2, 3):
            manager.save(step, state_of(rank, step))
        ckptio.wait()  # durable here: replication runs on a thread of its own, never ahead of a save
        durable = time.monotonic() - start
        manager.wait()  # ... and replication given up on
        seconds = time.monotonic() - start
    loaded = ckptio.load(manager.path_for(3))
    with open(os.path.join(out, "rank0.json"), "w") as f:
        json.dump({"steps": manager.steps(), "seconds": seconds, "durable": durable,
                   "exact": torch.equal(loaded["w"], state_of(0, 3)["w"]),
                   "warnings": [str(w.message) for w in caught if "replicat" in str(w.message)]}, f)
    sys.stdout.flush()
    os._exit(0)


def dcp_checkpoints(rank, world, port, root, out):
    """Plain DCP with ckptio.dcp_replicas, 2 ranks as 2 nodes (partners of
    each other), a shared checkpoint directory. Node 1 loses its memory tier
    and rank 1's file of step 1: rank 1 reads it from rank 0's replica.
    Then node 1 loses its memory again, and the replica rank 0 holds of
    step 2 is damaged in its RAM: rank 1 is warned and reads the directory.
    Each rank's outcome: rank<r>.json."""
    import shutil
    import warnings

    import torch.distributed.checkpoint as dcp

    from ckptio.dcp_replicas import DcpReplicas, memory_folder, rank_file
    from ckptio.distributed import StorageWriter

    _init(rank, world, port)
    os.environ.update(LOCAL_WORLD_SIZE="1", CKPTIO_SERVICE_DIR=f"{root}/node{rank}/service")
    replicas = DcpReplicas(keep=2)
    paths = {step: f"{root}/ckpt/step{step}" for step in (1, 2)}
    for step, path in paths.items():
        dcp.save({f"rank{rank}": state_of(rank, step)}, storage_writer=StorageWriter(path))
        replicas.after_save(path)

    def lose_node_1(step, damage):
        replicas.wait()  # every replica kept (on the replication thread) before the node goes
        dist.barrier()
        if rank == 1:
            shutil.rmtree(f"{root}/node1/service/memory")
            if not damage:
                os.remove(f"{paths[step]}/{rank_file(1)}")  # only the partner's replica can serve it
        if rank == 0 and damage:  # the replica rank 0 holds of rank 1's file, changed in RAM
            held = os.path.join(memory_folder(paths[step], 1), rank_file(1))
            data = bytearray(open(held, "rb").read())
            data[len(data) // 2] ^= 0xFF
            open(held, "wb").write(bytes(data))
        dist.barrier()

    outcome = {}
    for step, damage in ((1, False), (2, True)):
        lose_node_1(step, damage)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reader = replicas.reader(paths[step])
            target = {f"rank{rank}": {"w": torch.zeros(1 << 18), "b": torch.zeros(8, dtype=torch.int64), "step": 0}}
            dcp.load(target, storage_reader=reader)
        expected = state_of(rank, step)
        outcome[step] = {"from_partner": replicas.last_from_partner, "from_memory": sorted(reader.files_from_memory),
                         "from_disk": sorted(reader.files_from_disk),
                         "exact": all(torch.equal(target[f"rank{rank}"][k], expected[k]) for k in ("w", "b")),
                         "warnings": [str(w.message) for w in caught if "replica" in str(w.message)]}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    _finish()


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _finish():
    dist.barrier()  # leave together (a rank gone mid-collective aborts its peers), then at once
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
