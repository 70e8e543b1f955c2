"""What replicas cost and what they buy: CheckpointManager(replicas=1) on
4 gloo ranks as 2 "nodes" (each node its own checkpoint service, memory tier
in /dev/shm and local directory on disk, as tests/replica_cases.py), a
file:// remote tier.

- Training-step cost: a step of fixed work (matmuls) with an async save after
  each, same job shape with replicas=0 and replicas=1 (interleaved runs):
  the median step time, and the time to the last save durable (and
  replicated) after the loop.
- Recovery: node 0 lost (its service SIGKILLed, its memory tier and local
  checkpoints deleted), every rank's load_latest (max over ranks), the lost
  ranks served from their partners' memory; then both nodes lost, every rank
  from the remote tier: a file:// directory on this machine's disk (page
  cache dropped when allowed), or with --remote s3 a local S3 server (moto).

Usage: python bench/replication.py [--mib 64] [--steps 6] [--reps 2] [--remote file|s3] [--dir D] [--json F]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

WORLD, LOCAL = 4, 2


def _service_dir(root: str, node: int) -> str:
    """A node's service directory, and so its memory tier: in RAM (under
    /dev/shm, as the service's default), apart from the node's checkpoints
    on disk under `root`."""
    return os.path.join(os.environ["BENCH_RAM"], os.path.basename(root), f"node{node}", "service")


def _environment(rank: int, root: str) -> None:
    os.environ.update(LOCAL_WORLD_SIZE=str(LOCAL), CKPTIO_SERVICE_DIR=_service_dir(root, rank // LOCAL),
                      CKPTIO_SERVICE_IDLE_S="5", CKPTIO_MEMORY_KEEP_S="600")


def _manager(rank: int, root: str, replicas: int):  # type: ignore[no-untyped-def]
    import ckptio

    _environment(rank, root)
    remote = os.environ.get("BENCH_REMOTE") or f"file://{root}/remote"
    return ckptio.CheckpointManager(f"{root}/node{rank // LOCAL}/ckpt/rank{rank}", keep_last=2, memory=2,
                                    replicas=replicas, remote=f"{remote}/rank{rank}")


def _state(rank: int, mib: int):  # type: ignore[no-untyped-def]
    import torch

    return {"w": torch.randn(mib << 18, generator=torch.Generator().manual_seed(rank))}


def train(rank: int, world: int, port: int, root: str, replicas: int, mib: int, steps: int, out: str) -> None:
    import torch
    from replica_cases import _finish, _init

    _init(rank, world, port)
    torch.set_num_threads(1)
    manager = _manager(rank, root, replicas)
    state, a = _state(rank, mib), torch.randn(256, 256)
    times = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        for _ in range(40):  # the step's work
            a = torch.tanh(a @ a)
        state["w"][:1] = step
        manager.save(step, state)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    manager.close()
    drained = time.perf_counter() - start
    with open(os.path.join(out, f"train{rank}.json"), "w") as f:
        json.dump({"steps": times, "drain": drained}, f)
    _finish()


def resume(rank: int, world: int, port: int, root: str, out: str, name: str) -> None:
    from replica_cases import _finish, _init

    _init(rank, world, port)
    manager = _manager(rank, root, 1)
    phases = _timed_phases(manager)
    start = time.perf_counter()
    manager.load_latest()
    seconds = time.perf_counter() - start
    assert manager.last_loaded is not None
    with open(os.path.join(out, f"{name}{rank}.json"), "w") as f:
        json.dump({"seconds": seconds, "tier": manager.last_loaded.tier, "step": manager.last_loaded.step,
                   "phases": phases}, f)
    manager.close()
    _finish()


def _timed_phases(manager):  # type: ignore[no-untyped-def]
    """Where load_latest's time goes ({phase: s}, filled as it runs): listing
    the tiers (remote included), the agreement, the partner transfer."""
    phases: dict[str, float] = {}

    def timed(owner, attribute: str, phase: str) -> None:  # type: ignore[no-untyped-def]
        inner = getattr(owner, attribute)

        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start
        setattr(owner, attribute, wrapper)
    timed(manager, "_tiered_candidates", "list tiers")
    timed(manager._replication, "agree", "agree")
    timed(manager._replication, "transfer", "transfer")
    return phases


def _lose_node(root: str, node: int) -> None:
    from conftest import service_pids

    for pid in service_pids(_service_dir(root, node)):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(os.path.dirname(_service_dir(root, node)), ignore_errors=True)
    shutil.rmtree(f"{root}/node{node}", ignore_errors=True)


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _start_s3():  # type: ignore[no-untyped-def]
    """moto's S3 server on a free port; the ranks (spawned after) find it through the environment."""
    import s3fs
    from s3_server import _free_port, _start_server

    port = _free_port()
    server = _start_server(port)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(FSSPEC_S3_ENDPOINT_URL=endpoint, FSSPEC_S3_KEY="testing", FSSPEC_S3_SECRET="testing",
                      AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", BENCH_REMOTE="s3://ckpts/run")
    s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing").mkdir("ckpts")
    return server


def _read(out: str, name: str) -> list[dict]:
    result = []
    for r in range(WORLD):
        with open(os.path.join(out, f"{name}{r}.json")) as f:
            result.append(json.load(f))
    return result


def main() -> int:
    import argparse

    from dcp_cases import run

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="checkpoint size per rank")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--remote", choices=("file", "s3"), default="file",
                    help="the remote tier: a file:// directory on this disk, or a local S3 server (moto)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "replication.json"))
    args = ap.parse_args()
    train_runs: dict[int, list[dict]] = {0: [], 1: []}
    recovery: dict[str, list[float]] = {"partner": [], "remote": []}
    tiers: dict[str, list[str]] = {}
    phase_s: dict[str, dict[str, list[float]]] = {"partner": {}, "remote": {}}
    cold = False
    server = _start_s3() if args.remote == "s3" else None
    ram = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="ckptio-replication-", dir=args.dir or os.getcwd()) as work, \
            tempfile.TemporaryDirectory(prefix="ckptio-replication-", dir=ram) as memory:
        os.environ["BENCH_RAM"] = memory  # the ranks (spawned after) put their nodes' memory tiers there
        for rep in range(args.reps):
            for replicas in (0, 1):
                root, out = os.path.join(work, f"r{rep}-{replicas}"), os.path.join(work, f"out{rep}-{replicas}")
                os.makedirs(out)
                run(train, WORLD, root, replicas, args.mib, args.steps, out)
                train_runs[replicas].append({"ranks": _read(out, "train")})
                if replicas:
                    _lose_node(root, 0)
                    run(resume, WORLD, root, out, "partner")
                    _lose_node(root, 0)
                    _lose_node(root, 1)
                    cold = _drop_caches()
                    run(resume, WORLD, root, out, "remote")
                    for name in ("partner", "remote"):
                        ranks = _read(out, name)
                        slowest = max(ranks, key=lambda r: r["seconds"])
                        recovery[name].append(slowest["seconds"])
                        tiers[name] = [r["tier"] for r in ranks]
                        for phase, seconds in slowest["phases"].items():
                            phase_s[name].setdefault(phase, []).append(seconds)
                for node in (0, 1):
                    _lose_node(root, node)
            print(f"rep {rep + 1}/{args.reps} done", flush=True)
    if server is not None:
        server.kill()
    step_s = {k: statistics.median(t for run_ in v for rank in run_["ranks"] for t in rank["steps"][1:])
              for k, v in train_runs.items()}
    drain_s = {k: statistics.median(max(rank["drain"] for rank in run_["ranks"]) for run_ in v)
               for k, v in train_runs.items()}
    partner, remote = statistics.median(recovery["partner"]), statistics.median(recovery["remote"])
    print(f"\n4 ranks as 2 nodes, {args.mib} MiB per rank, an async save after each of {args.steps} steps, "
          f"median of {args.reps} runs")
    print(f"{'':<44}{'replicas=0':>12}{'replicas=1':>12}{'ratio':>8}")
    print(f"{'training step with its save (median s)':<44}{step_s[0]:>12.3f}{step_s[1]:>12.3f}"
          f"{step_s[1] / step_s[0]:>7.2f}x")
    print(f"{'close(): last save durable (+ replicated) s':<44}{drain_s[0]:>12.3f}{drain_s[1]:>12.3f}"
          f"{drain_s[1] / drain_s[0]:>7.2f}x")
    where = "a local S3 server (moto)" if server is not None else \
        f"file:// on this disk, {'cold' if cold else 'warm'} cache"
    print(f"\nrecovery, every rank's load_latest (max over ranks): node 0 lost, {tiers.get('partner')}: "
          f"{partner:.3f} s; both nodes lost, {tiers.get('remote')} ({where}): {remote:.3f} s; "
          f"{remote / partner:.2f}x")
    for name in ("partner", "remote"):
        split = ", ".join(f"{phase} {statistics.median(p):.3f}" for phase, p in phase_s[name].items())
        print(f"  {name}: load_latest's phases on the slowest rank (median s): {split}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"mib_per_rank": args.mib, "steps": args.steps, "reps": args.reps, "remote": args.remote,
                   "step_s": step_s,
                   "drain_s": drain_s, "recovery_s": {"partner": partner, "remote": remote}, "tiers": tiers,
                   "cold_cache": cold, "train_runs": train_runs, "recovery_runs": recovery,
                   "recovery_phases_s": phase_s}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
