#!/usr/bin/env python3
"""Benchmark how long ckptio's async saves block training, and what they cost.

What is measured, and why:

1. Stall: how long the save call blocks the caller, on state dicts of
   ``--sizes`` GiB (the mix of save_load.py: few large, many medium, thousands
   of small tensors). The baseline is the least any snapshot can cost: one
   ``copy_`` of every tensor into a preallocated, already-touched copy of the
   state. ckptio.async_save should stall <= 1.15x of it. Shown for context:
   ckptio's AsyncCheckpointIO plugin, Lightning's AsyncCheckpointIO (wrapping
   its TorchCheckpointIO: it clones every tensor on the caller's thread) and
   torch.distributed.checkpoint.async_save (a gloo process group of one; it
   stages a copy, then writes in a thread). Every save is waited for before
   the next timed one, so no stall includes queue back-pressure. The copy_
   baseline, ckptio.async_save, the plugin and ckptio.save take turns, one
   repetition each (if RAM cannot hold the state, the copy and both staging
   slots, the copy_ repetitions run first instead; the JSON says which). The
   stall runs use torch's default thread count (set OMP_NUM_THREADS to pin it).
2. Time until durable: ckptio.async_save from the call to ``h.result()``
   returning, against ckptio.save of the same state (ratio reported).
3. Training interference: a Python-heavy CPU training loop (a small MLP run
   over many tiny micro-batches, calibrated to ~50 ms a step, with
   torch.set_num_threads(1) so the second core is left to the background
   writer) run (a) without checkpoints, (b) with ckptio.async_save of a
   separate ``--interference-size`` GiB state every ``--every`` steps, (c) with
   Lightning's AsyncCheckpointIO of the same. Mean and p99 step time against
   (a); ckptio's mean should be <= 1.10x. A checkpointing step's time includes
   its save call. Saves still queued at the end are drained after the timed
   steps (drain time reported separately).
4. Peak resident memory of async saves, in a fresh process per mode: growth of
   RSS above the RSS right after the state is allocated (VmHWM after resetting
   it through /proc/self/clear_refs, cross-checked by sampling RSS every 5 ms),
   over ``--reps`` saves, each waited for.
   - staged (default settings): growth <= 2.2x the state (the arena's two
     slots, the second faulted in the background after the first save so
     that a save overlapping a write never faults on the caller's thread,
     + 10%);
   - streaming (CKPTIO_STAGING_BUDGET_MB=64, CKPTIO_CHUNK_MB=64): growth <=
     2.2 chunks (two chunks + 10%);
   - staged with CKPTIO_STAGING_SLOTS=1: for context.

Each size's measurements run in fresh subprocesses (ckptio's group, Lightning,
DCP, each memory mode), so one backend's buffers never sit in another's
numbers and a 4 GiB run fits in RAM. Every timed measurement has one untimed
warm-up first (first touch of fresh memory is slow on some VMs) and reports
the median of ``--reps`` repetitions, every repetition kept in the JSON.
ckptio faults in a staging slot on its first use: in the stall runs the two
warm-ups (async_save, then the plugin) fault both default slots; in the
training run the warm-up checkpoint faults one and the first timed checkpoint
the other, as in real training, and that stays in the numbers.
Nothing is tuned or adjusted: the table says whether each target was met. The
load average at the start and end is recorded: on a shared 2-core machine,
other work shows up in these timings.

Usage: python bench/async_stall.py [--sizes 1,4] [--reps 5] [--dir D] [--json F]
                                   [--interference-size 1] [--steps 200] [--every 10]
       python bench/async_stall.py --quick      # 0.25 GiB, 3 reps, 60 steps
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import numpy as np
import torch

import ckptio
from save_load import (  # same state dicts, machine description and comparison records
    GIB,
    MIB,
    describe_state_dict,
    filesystem_type,
    machine_info,
    make_state_dict,
)
from save_load import comparison as _comparison

REPO_ROOT = os.path.dirname(HERE)
DEFAULT_JSON = os.path.join(REPO_ROOT, "bench", "results", "async_stall.json")

# Targets from the issue.
TARGET_STALL_VS_COPY = 1.15        # ckptio.async_save stall / warm copy_ of the state
TARGET_TRAIN_MEAN = 1.10           # mean step time with ckptio saves / without saves
TARGET_STAGED_GROWTH = 2.20        # peak RSS growth / state bytes (two staging slots + 10%)
TARGET_STREAM_GROWTH_CHUNKS = 2.2  # peak RSS growth / chunk bytes (two chunks + 10%)

STREAM_ENV = {"CKPTIO_STAGING_BUDGET_MB": "64", "CKPTIO_CHUNK_MB": "64"}
TARGET_STEP_S = 0.050  # training step length the loop is calibrated to


def comparison(label, measurement, value, target, higher_is_better=True, unit="x") -> dict:
    """save_load.comparison; a missing value (the worker failed) misses its target."""
    if value is None:
        c = _comparison(label, measurement, 0.0, None, higher_is_better, unit)
        c.update(value=None, target=target, met=None if target is None else False)
        return c
    return _comparison(label, measurement, value, target, higher_is_better, unit)


def median(xs):
    return statistics.median(xs) if xs else None


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def sync_disk() -> None:
    """Flush dirty pages so a previous save's writeback doesn't land in the next timing."""
    os.sync()


def rm(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------
# Worker: stall and durable time, ckptio (its own process per size)
# --------------------------------------------------------------------------

def worker_ckptio(p: dict) -> dict:
    size, reps, workdir = p["size_gib"], p["reps"], p["workdir"]
    sd = make_state_dict(size)
    out = {"state_dict": describe_state_dict(sd), "torch_num_threads": torch.get_num_threads()}

    # Baseline: copy_ of every tensor into a preallocated, already-touched copy.
    # Its reps are interleaved with ckptio's (a busy machine then weighs on
    # both) when RAM holds the state, the copy and every staging slot;
    # otherwise they run first and the copy is freed before the arena exists.
    from ckptio.config import staging_config

    state_bytes = out["state_dict"]["bytes"]
    slots = staging_config().slots
    interleave = mem_available() > (1 + slots) * state_bytes + GIB
    out["baseline_interleaved"] = interleave
    dst = {k: torch.empty_like(t) for k, t in sd.items()}
    copy_times = []

    def copy_all():
        for k, t in sd.items():
            dst[k].copy_(t)

    def timed_copy():
        t0 = time.perf_counter()
        copy_all()
        copy_times.append(time.perf_counter() - t0)

    copy_all()  # warm-up: first touch of dst
    if not interleave:
        for _ in range(reps):
            timed_copy()
        del dst
        gc.collect()

    async_stall, async_durable, async_modes, async_io = [], [], [], []
    plugin_stall, plugin_durable = [], []
    sync_times, sync_io = [], []
    warmup = {}
    plugin = ckptio.AsyncCheckpointIO()

    def run_async(tag):
        path = os.path.join(workdir, f"async-{tag}.ckpt")
        sync_disk()
        t0 = time.perf_counter()
        h = ckptio.async_save(sd, path)
        returned = time.perf_counter() - t0
        res = h.result()
        durable = time.perf_counter() - t0
        rm(path)
        return h, returned, durable, res

    def run_plugin(tag):
        path = os.path.join(workdir, f"plugin-{tag}.ckpt")
        sync_disk()
        t0 = time.perf_counter()
        h = plugin.save_checkpoint(sd, path)
        returned = time.perf_counter() - t0
        h.result()
        durable = time.perf_counter() - t0
        rm(path)
        return h, returned, durable

    def run_sync(tag):
        path = os.path.join(workdir, f"sync-{tag}.ckpt")
        sync_disk()
        t0 = time.perf_counter()
        res = ckptio.save(sd, path)
        elapsed = time.perf_counter() - t0
        rm(path)
        return elapsed, res

    # One untimed warm-up each (the warm-up async_save allocates and faults one
    # staging slot; its numbers are kept for the record).
    h, returned, durable, _ = run_async("warmup")
    warmup["ckptio.async_save"] = {"stall_s": h.stall_seconds, "returned_s": returned,
                                   "durable_s": durable, "mode": h.mode}
    h, returned, durable = run_plugin("warmup")
    warmup["ckptio.AsyncCheckpointIO"] = {"stall_s": h.stall_seconds, "returned_s": returned,
                                          "durable_s": durable, "mode": h.mode}
    elapsed, _ = run_sync("warmup")
    warmup["ckptio.save"] = {"seconds": elapsed}

    returned_times = []
    for rep in range(reps):  # round-robin
        if interleave:
            timed_copy()
        h, returned, durable, res = run_async(rep)
        async_stall.append(h.stall_seconds)
        returned_times.append(returned)
        async_durable.append(durable)
        async_modes.append(h.mode)
        async_io.append(res.direct_io)
        h, returned, durable = run_plugin(rep)
        plugin_stall.append(h.stall_seconds)
        plugin_durable.append(durable)
        elapsed, res = run_sync(rep)
        sync_times.append(elapsed)
        sync_io.append(res.direct_io)
    plugin.teardown()

    out["copy_"] = {"times_s": copy_times, "median_s": median(copy_times)}
    out["ckptio.async_save"] = {
        "times_s": async_stall, "median_s": median(async_stall),
        "call_returned_s": returned_times,  # wall time of the call, cross-check of stall_seconds
        "modes": async_modes, "direct_io": async_io,
    }
    out["ckptio.AsyncCheckpointIO"] = {"times_s": plugin_stall, "median_s": median(plugin_stall),
                                       "durable_s": plugin_durable}
    out["durable"] = {
        "ckptio.save": {"times_s": sync_times, "median_s": median(sync_times), "direct_io": sync_io},
        "ckptio.async_save": {"times_s": async_durable, "median_s": median(async_durable)},
    }
    out["warmup"] = warmup
    return out


# --------------------------------------------------------------------------
# Worker: Lightning AsyncCheckpointIO stall
# --------------------------------------------------------------------------

def lightning_async_io():
    from lightning.fabric.plugins import TorchCheckpointIO
    from lightning.pytorch.plugins.io import AsyncCheckpointIO as LAsync

    return LAsync(TorchCheckpointIO())


def worker_lightning(p: dict) -> dict:
    import lightning

    size, reps, workdir = p["size_gib"], p["reps"], p["workdir"]
    sd = make_state_dict(size)
    io = lightning_async_io()
    stalls, written = [], []

    def once(tag):
        path = os.path.join(workdir, f"lightning-{tag}.ckpt")
        sync_disk()
        t0 = time.perf_counter()
        io.save_checkpoint(sd, path)
        stall = time.perf_counter() - t0
        io.teardown()  # waits for the write (not fsynced: TorchCheckpointIO doesn't)
        done = time.perf_counter() - t0
        rm(path)
        return stall, done

    warm_stall, warm_done = once("warmup")
    for rep in range(reps):
        s, d = once(rep)
        stalls.append(s)
        written.append(d)
    return {"lightning": lightning.__version__,
            "Lightning AsyncCheckpointIO": {"times_s": stalls, "median_s": median(stalls),
                                            "written_s": written, "durable": False,
                                            "warmup": {"stall_s": warm_stall, "written_s": warm_done}}}


# --------------------------------------------------------------------------
# Worker: torch.distributed.checkpoint.async_save stall
# --------------------------------------------------------------------------

def worker_dcp(p: dict) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    size, reps, workdir = p["size_gib"], p["reps"], p["workdir"]
    store = dist.FileStore(os.path.join(workdir, "dcp-store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        sd = make_state_dict(size)
        stalls, done = [], []

        def once(tag):
            ckpt_dir = os.path.join(workdir, f"dcp-{tag}")
            sync_disk()
            t0 = time.perf_counter()
            fut = dcp.async_save(sd, checkpoint_id=ckpt_dir)
            stall = time.perf_counter() - t0
            fut.result()
            finished = time.perf_counter() - t0
            rm(ckpt_dir)
            return stall, finished

        warm_stall, warm_done = once("warmup")
        for rep in range(reps):
            s, d = once(rep)
            stalls.append(s)
            done.append(d)
    finally:
        dist.destroy_process_group()
    return {"torch.distributed.checkpoint.async_save": {
        "times_s": stalls, "median_s": median(stalls), "completed_s": done,
        "warmup": {"stall_s": warm_stall, "completed_s": warm_done}}}


# --------------------------------------------------------------------------
# Worker: peak resident memory during async saves (env set by the parent)
# --------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def vm_hwm_bytes() -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def reset_hwm() -> str | None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); returns why not, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return None
    except OSError as exc:
        return f"cannot write /proc/self/clear_refs: {exc.strerror}"


class RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self.samples = interval, 0, 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def worker_memory(p: dict) -> dict:
    from ckptio.config import staging_config

    size, reps, workdir = p["size_gib"], p["reps"], p["workdir"]
    cfg = staging_config()
    sd = make_state_dict(size)
    state_bytes = sum(t.nbytes for t in sd.values())
    gc.collect()
    time.sleep(0.2)
    base = rss_bytes()
    hwm_reset_error = reset_hwm()
    sampler = RssSampler()
    sampler.start()
    saves = []
    for rep in range(reps):
        path = os.path.join(workdir, f"mem-{p['mode']}-{rep}.ckpt")
        t0 = time.perf_counter()
        h = ckptio.async_save(sd, path)
        res = h.result()
        durable = time.perf_counter() - t0
        saves.append({"mode": h.mode, "stall_s": h.stall_seconds, "durable_s": durable,
                      "rss_growth_after_bytes": rss_bytes() - base,
                      "sampled_peak_growth_so_far_bytes": sampler.peak - base,
                      "block_bytes": res.block_bytes, "direct_io": res.direct_io})
        rm(path)
    sampled_peak = sampler.stop()
    hwm = vm_hwm_bytes()
    hwm_growth = None if hwm_reset_error or hwm is None else hwm - base
    sampled_growth = sampled_peak - base
    peak_growth = sampled_growth if hwm_growth is None else max(hwm_growth, sampled_growth)
    return {
        "mode": p["mode"], "env": p["env"], "state_bytes": state_bytes,
        "staging_config": {"slots": cfg.slots, "budget_bytes": cfg.budget_bytes,
                           "chunk_bytes": cfg.chunk_bytes, "max_pending": cfg.max_pending},
        "rss_after_state_bytes": base,
        "peak_growth_bytes": peak_growth,
        "vmhwm_growth_bytes": hwm_growth, "vmhwm_reset_error": hwm_reset_error,
        "sampled_peak_growth_bytes": sampled_growth, "samples": sampler.samples,
        "saves": saves,
    }


# --------------------------------------------------------------------------
# Worker: training interference
# --------------------------------------------------------------------------

WIDTH, DEPTH, MICRO_BATCH = 64, 6, 8


def build_training(seed: int = 0):
    torch.manual_seed(seed)
    layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))
    opt = torch.optim.SGD(layers.parameters(), lr=1e-3)
    xs = [torch.randn(MICRO_BATCH, WIDTH) for _ in range(16)]
    return layers, opt, xs


def train_step(layers, opt, xs, inner: int) -> float:
    """Python-heavy: `inner` tiny micro-batches, ~10 small ops each, one backward."""
    opt.zero_grad(set_to_none=True)
    loss = 0.0
    for i in range(inner):
        h = xs[i % len(xs)]
        for layer in layers:
            h = torch.relu(layer(h))
        loss = loss + h.square().mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def worker_calibrate(p: dict) -> dict:
    torch.set_num_threads(1)
    layers, opt, xs = build_training()
    probe = 8
    for _ in range(10):
        train_step(layers, opt, xs, probe)
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        train_step(layers, opt, xs, probe)
        times.append(time.perf_counter() - t0)
    inner = max(1, round(TARGET_STEP_S / (median(times) / probe)))
    for _ in range(2):  # refine: a step also has a fixed cost (backward, optimizer)
        t = []
        for _ in range(7):
            t0 = time.perf_counter()
            train_step(layers, opt, xs, inner)
            t.append(time.perf_counter() - t0)
        inner = max(1, round(inner * TARGET_STEP_S / median(t)))
    check = []
    for _ in range(10):
        t0 = time.perf_counter()
        train_step(layers, opt, xs, inner)
        check.append(time.perf_counter() - t0)
    return {"inner": inner, "probe_inner": probe, "probe_step_s": times, "check_step_s": check,
            "check_median_s": median(check)}


def worker_train(p: dict) -> dict:
    torch.set_num_threads(1)  # the same for every variant: one core trains, one is left for I/O
    variant, workdir = p["variant"], p["workdir"]
    steps, every, warm_steps, inner = p["steps"], p["every"], p["warmup_steps"], p["inner"]
    layers, opt, xs = build_training()
    ckpt_state = None
    if variant != "none":
        ckpt_state = {"model": layers.state_dict(), "state": make_state_dict(p["size_gib"], seed=1)}
    paths = [os.path.join(workdir, f"train-{variant}-{i}.ckpt") for i in range(3)]

    io = lightning_async_io() if variant == "lightning" else None
    handles = []

    def checkpoint(k: int):
        path = paths[k % len(paths)]
        if variant == "ckptio":
            h = ckptio.async_save(ckpt_state, path)
            handles.append(h)
        elif variant == "lightning":
            io.save_checkpoint(ckpt_state, path)

    def drain():
        if variant == "ckptio":
            ckptio.wait()
        elif variant == "lightning":
            io.teardown()

    for _ in range(warm_steps):
        train_step(layers, opt, xs, inner)
    warm_ckpt = None
    if variant != "none":  # one untimed warm-up checkpoint, drained
        t0 = time.perf_counter()
        checkpoint(-1)
        warm_ckpt = {"call_s": time.perf_counter() - t0}
        drain()
        warm_ckpt["drained_s"] = time.perf_counter() - t0
        handles.clear()
        sync_disk()

    step_times, ckpt_steps, ckpt_call_s = [], [], []
    t_loop = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        train_step(layers, opt, xs, inner)
        if variant != "none" and (step + 1) % every == 0:
            c0 = time.perf_counter()
            checkpoint(step)
            ckpt_call_s.append(time.perf_counter() - c0)
            ckpt_steps.append(step)
        step_times.append(time.perf_counter() - t0)
    loop_s = time.perf_counter() - t_loop
    t0 = time.perf_counter()
    drain()
    drain_s = time.perf_counter() - t0

    out = {"variant": variant, "steps": steps, "every": every, "inner": inner,
           "torch_num_threads": torch.get_num_threads(),
           "step_times_s": step_times, "mean_s": float(np.mean(step_times)),
           "p99_s": float(np.percentile(step_times, 99)), "median_s": median(step_times),
           "loop_s": loop_s, "drain_s": drain_s, "checkpoint_steps": ckpt_steps,
           "checkpoint_call_s": ckpt_call_s, "warmup_checkpoint": warm_ckpt}
    if ckpt_state is not None:
        out["checkpoint_bytes_in_tensors"] = sum(
            t.nbytes for t in ckpt_state["state"].values()) + sum(
            t.nbytes for t in ckpt_state["model"].values())
    if variant == "ckptio":
        out["stall_s"] = [h.stall_seconds for h in handles]
        out["modes"] = sorted({h.mode for h in handles})
        out["write_s"] = [h.result().write_seconds for h in handles]
    for path in paths:
        rm(path)
    return out


WORKERS = {"ckptio": worker_ckptio, "lightning": worker_lightning, "dcp": worker_dcp,
           "memory": worker_memory, "calibrate": worker_calibrate, "train": worker_train}


def worker_main(kind: str, params_json: str) -> int:
    p = json.loads(params_json)
    result = WORKERS[kind](p)
    with open(p["out"], "w") as f:
        json.dump(result, f)
    return 0


def run_worker(kind: str, params: dict, workdir: str, env_extra: dict | None = None) -> dict:
    """Run one measurement in a fresh interpreter; its result, or {"error": ...}."""
    out = os.path.join(workdir, f"result-{kind}-{os.getpid()}-{time.monotonic_ns()}.json")
    params = {**params, "workdir": workdir, "out": out}
    env = {**os.environ, **(env_extra or {})}
    sync_disk()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind,
                           "--worker-params", json.dumps(params)],
                          env=env, cwd=workdir, stderr=subprocess.PIPE, text=True)
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0 or not os.path.exists(out):
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        print(f"   !! {kind} worker failed (rc {proc.returncode}): {tail}", flush=True)
        return {"error": f"rc {proc.returncode}: {tail}"}
    with open(out) as f:
        result = json.load(f)
    rm(out)
    return result


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------

def bench_size(size_gib: float, reps: int, workdir: str) -> dict:
    params = {"size_gib": size_gib, "reps": reps}
    print(f"\n== {size_gib:g} GiB: stall and durable time, ckptio (copy_ baseline, async_save, "
          f"plugin, save) ...", flush=True)
    ck = run_worker("ckptio", params, workdir)
    print(f"== {size_gib:g} GiB: stall, Lightning AsyncCheckpointIO ...", flush=True)
    light = run_worker("lightning", params, workdir)
    print(f"== {size_gib:g} GiB: stall, torch.distributed.checkpoint.async_save ...", flush=True)
    dcp = run_worker("dcp", params, workdir)
    memory = {}
    for mode, env in (("staged", {}), ("streaming", STREAM_ENV),
                      ("staged, 1 slot", {"CKPTIO_STAGING_SLOTS": "1"})):
        print(f"== {size_gib:g} GiB: peak memory, {mode} ({env or 'default settings'}) ...", flush=True)
        memory[mode] = run_worker("memory", {**params, "mode": mode, "env": env}, workdir, env)

    stall = {}
    for name, src in (("copy_ (warm, preallocated)", ck.get("copy_")),
                      ("ckptio.async_save", ck.get("ckptio.async_save")),
                      ("ckptio.AsyncCheckpointIO", ck.get("ckptio.AsyncCheckpointIO")),
                      ("Lightning AsyncCheckpointIO", light.get("Lightning AsyncCheckpointIO")),
                      ("torch.distributed.checkpoint.async_save",
                       dcp.get("torch.distributed.checkpoint.async_save"))):
        stall[name] = src
    result = {
        "size_gib": size_gib,
        "state_dict": ck.get("state_dict"),
        "stall": stall,
        "durable": ck.get("durable"),
        "warmup": ck.get("warmup"),
        "memory": memory,
        "errors": {k: v["error"] for k, v in (("ckptio", ck), ("lightning", light), ("dcp", dcp))
                   if "error" in v} | {f"memory {k}": v["error"] for k, v in memory.items() if "error" in v},
    }
    result["comparisons"] = size_comparisons(result)
    return result


def size_comparisons(r: dict) -> list[dict]:
    out = []
    stall = r["stall"]
    base = stall.get("copy_ (warm, preallocated)")
    targets = {"ckptio.async_save": TARGET_STALL_VS_COPY}
    for name in ("ckptio.async_save", "ckptio.AsyncCheckpointIO", "Lightning AsyncCheckpointIO",
                 "torch.distributed.checkpoint.async_save"):
        m = stall.get(name)
        if base and m:
            c = comparison("stall vs copy_", name, m["median_s"] / base["median_s"],
                           targets.get(name), higher_is_better=False)
        else:
            c = comparison("stall vs copy_", name, None, targets.get(name), higher_is_better=False)
        out.append(c)
    d = r["durable"]
    if d:
        out.append(comparison("durable time vs ckptio.save", "ckptio.async_save (call to result)",
                              d["ckptio.async_save"]["median_s"] / d["ckptio.save"]["median_s"],
                              None, higher_is_better=False))
    for mode, target, unit, denom_key in (("staged", TARGET_STAGED_GROWTH, "x state", "state"),
                                          ("streaming", TARGET_STREAM_GROWTH_CHUNKS, "x chunk", "chunk"),
                                          ("staged, 1 slot", None, "x state", "state")):
        m = r["memory"].get(mode, {})
        label = f"peak RSS growth ({mode})"
        if "error" in m or not m:
            c = comparison(label, f"memory: {mode}", None, target, higher_is_better=False, unit=unit)
        else:
            denom = m["state_bytes"] if denom_key == "state" else m["staging_config"]["chunk_bytes"]
            c = comparison(label, f"memory: {mode}", m["peak_growth_bytes"] / denom, target,
                           higher_is_better=False, unit=unit)
            if mode == "streaming" and any(s["mode"] != "streaming" for s in m["saves"]):
                c["met"] = None  # the state fits the budget: nothing streamed, no verdict
                c["note"] = "not streamed (state <= CKPTIO_STAGING_BUDGET_MB)"
        out.append(c)
    return out


def bench_interference(args, workdir: str) -> dict:
    print(f"\n== training interference: calibrating a ~{TARGET_STEP_S * 1e3:.0f} ms step ...", flush=True)
    cal = run_worker("calibrate", {}, workdir)
    if "error" in cal:
        return {"error": cal["error"], "comparisons": []}
    print(f"   {cal['inner']} micro-batches a step, {cal['check_median_s'] * 1e3:.1f} ms", flush=True)
    params = {"steps": args.steps, "every": args.every, "warmup_steps": args.warmup_steps,
              "inner": cal["inner"], "size_gib": args.interference_size}
    variants = {}
    for variant, title in (("none", "no checkpoints"), ("ckptio", "ckptio.async_save"),
                           ("lightning", "Lightning AsyncCheckpointIO")):
        print(f"== training: {title}, {args.steps} steps"
              + ("" if variant == "none" else f", {args.interference_size:g} GiB every {args.every}")
              + " ...", flush=True)
        variants[variant] = run_worker("train", {**params, "variant": variant}, workdir)
    out = {"calibration": cal, "config": params, "variants": variants}
    base = variants["none"]
    comps = []
    for variant, name, target in (("ckptio", "training: ckptio.async_save", TARGET_TRAIN_MEAN),
                                  ("lightning", "training: Lightning AsyncCheckpointIO", None)):
        v = variants[variant]
        for stat, tgt in (("mean_s", target), ("p99_s", None)):
            label = f"{stat[:-2]} step time vs no checkpoints"
            if "error" in v or "error" in base:
                c = comparison(label, f"{name} ({stat[:-2]})", None, tgt, higher_is_better=False)
            else:
                c = comparison(label, f"{name} ({stat[:-2]})", v[stat] / base[stat], tgt,
                               higher_is_better=False)
            comps.append(c)
    out["comparisons"] = comps
    return out


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def _ratio(c: dict | None) -> str:
    if c is None:
        return "(baseline)"
    if c["value"] is None:
        return "error"
    return f"{c['value']:.2f}{c['unit']}"


def _target(c: dict | None) -> str:
    if c is None or c["target"] is None:
        return "-"
    return f"{'>=' if c['higher_is_better'] else '<='} {c['target']:g}{c['unit']}"


def _met(c: dict | None) -> str:
    if c is not None and c.get("note"):
        return c["note"]
    if c is None or c["met"] is None:
        return "-"
    return "yes" if c["met"] else "NO"


def _secs(m: dict | None) -> str:
    if not m or m.get("median_s") is None:
        return "error"
    v = m["median_s"]
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.3f} s"


def _bytes(n: int) -> str:
    return f"{n / GIB:.3f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"


def table_rows(results: dict) -> list[tuple]:
    rows = []
    for size in results["sizes"]:
        tag = f"[{size['size_gib']:g} GiB]"
        comps = {c["measurement"]: c for c in size["comparisons"]}
        for name, m in size["stall"].items():
            c = comps.get(name)
            rows.append((f"{tag} stall: {name}", _secs(m), _ratio(c), _target(c), _met(c)))
        d = size["durable"] or {}
        rows.append((f"{tag} durable: ckptio.save", _secs(d.get("ckptio.save")), "(baseline)", "-", "-"))
        c = comps.get("ckptio.async_save (call to result)")
        rows.append((f"{tag} durable: ckptio.async_save (call to result)",
                     _secs(d.get("ckptio.async_save")), _ratio(c), _target(c), _met(c)))
        for mode, m in size["memory"].items():
            c = comps[f"memory: {mode}"]
            value = "error" if "error" in m else f"{_bytes(m['peak_growth_bytes'])} (peak)"
            rows.append((f"{tag} memory: {mode}, RSS growth", value, _ratio(c), _target(c), _met(c)))
    inter = results.get("interference")
    if inter:
        v = inter.get("variants", {})
        size = inter.get("config", {}).get("size_gib")
        tag = f"[train, {size:g} GiB/{inter['config']['every']} steps]" if size is not None else "[train]"
        comps = {c["measurement"]: c for c in inter["comparisons"]}
        for variant, name in (("none", "training: no checkpoints"), ("ckptio", "training: ckptio.async_save"),
                              ("lightning", "training: Lightning AsyncCheckpointIO")):
            m = v.get(variant, {"error": inter.get("error")})
            for stat in ("mean", "p99"):
                value = "error" if "error" in m else f"{m[stat + '_s'] * 1e3:.1f} ms"
                c = comps.get(f"{name} ({stat})")
                rows.append((f"{tag} {name} ({stat} step)", value, _ratio(c), _target(c), _met(c)))
    return rows


def print_table(results: dict) -> None:
    header = ("measurement", "median", "ratio vs baseline", "target", "met?")
    rows = table_rows(results)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print()
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r))
    print("\nmemory rows: the largest RSS growth over all saves, not a median; growth is above the RSS\n"
          "right after the state was allocated. Training rows: mean / p99 over all timed steps.")
    for size in results["sizes"]:
        w = size.get("warmup") or {}
        a = w.get("ckptio.async_save")
        stalls = (size["stall"].get("ckptio.async_save") or {}).get("times_s") or []
        if a:
            print(f"[{size['size_gib']:g} GiB] ckptio.async_save: warm-up stall {a['stall_s']:.3f} s, "
                  f"timed stalls {', '.join(f'{s:.3f}' for s in stalls)} s")
        for mode, m in size["memory"].items():
            if "error" not in m:
                print(f"[{size['size_gib']:g} GiB] memory {mode}: RSS growth after each save "
                      f"{', '.join(_bytes(s['rss_growth_after_bytes']) for s in m['saves'])}; "
                      f"modes {sorted({s['mode'] for s in m['saves']})}")
        if size.get("errors"):
            print(f"[{size['size_gib']:g} GiB] errors: {size['errors']}")
    inter = results.get("interference") or {}
    for variant, m in inter.get("variants", {}).items():
        if "error" not in m and m.get("checkpoint_call_s"):
            print(f"[train] {variant}: {len(m['checkpoint_call_s'])} checkpoints, save call "
                  f"median {median(m['checkpoint_call_s']) * 1e3:.0f} ms / max "
                  f"{max(m['checkpoint_call_s']) * 1e3:.0f} ms; drain after the loop {m['drain_s']:.2f} s")
    m = results["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total']} RAM, kernel {m['kernel']}, "
          f"{m['bench_dir_fs']} at {m['bench_dir']}, torch {m['torch']}, lightning {m.get('lightning')}, "
          f"CKPTIO_* {m['ckptio_env'] or 'unset'}, load average {m['loadavg_start'][0]:.2f} at start, "
          f"{m['loadavg_end'][0]:.2f} at end")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1,4",
                   help="comma-separated state sizes in GiB (fractions allowed), default 1,4")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (>= 3), default 5")
    p.add_argument("--dir", default=None,
                   help="directory to write in (a temp dir is made inside it); default: the repo root")
    p.add_argument("--json", default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--interference-size", type=float, default=1.0,
                   help="GiB of the state checkpointed during the training loop, default 1")
    p.add_argument("--steps", type=int, default=200, help="timed training steps per variant, default 200")
    p.add_argument("--every", type=int, default=10, help="checkpoint every N training steps, default 10")
    p.add_argument("--warmup-steps", type=int, default=20, help="untimed training steps first, default 20")
    p.add_argument("--no-interference", action="store_true", help="skip the training-loop measurement")
    p.add_argument("--quick", action="store_true",
                   help="a quick check: --sizes 0.25 --reps 3 --interference-size 0.25 --steps 60")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-params", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    if args.quick:
        args.sizes, args.reps, args.interference_size, args.steps = "0.25", 3, 0.25, 60
    args.sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    if args.reps < 3:
        p.error("--reps must be at least 3")
    if not args.sizes or any(s <= 0 for s in args.sizes) or args.interference_size <= 0:
        p.error("sizes must be positive numbers of GiB")
    if args.steps < 1 or args.every < 1 or args.warmup_steps < 0:
        p.error("--steps and --every must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.worker_params)
    parent = os.path.abspath(args.dir or REPO_ROOT)
    if filesystem_type(parent) == "tmpfs":
        print(f"warning: {parent} is tmpfs; disk numbers will be meaningless", file=sys.stderr)
    workdir = tempfile.mkdtemp(prefix=".ckptio-bench-", dir=parent)
    try:
        machine = machine_info(workdir)
        try:
            import lightning
            machine["lightning"] = lightning.__version__
        except ImportError as exc:
            machine["lightning"] = f"unavailable: {exc}"
        machine["loadavg_start"] = loadavg()
        if machine["loadavg_start"][0] > 0.5:
            print(f"note: load average {machine['loadavg_start'][0]:.2f} before starting: other work on "
                  "this machine will show in the timings", flush=True)
        machine["torch_num_threads_stall"] = torch.get_num_threads()
        machine["torch_num_threads_training"] = 1
        results = {"machine": machine,
                   "config": {"sizes_gib": args.sizes, "reps": args.reps,
                              "interference_size_gib": None if args.no_interference else args.interference_size,
                              "steps": args.steps, "every": args.every, "warmup_steps": args.warmup_steps,
                              "streaming_env": STREAM_ENV},
                   "targets": {"stall_vs_copy": TARGET_STALL_VS_COPY, "train_mean_ratio": TARGET_TRAIN_MEAN,
                               "staged_growth_x_state": TARGET_STAGED_GROWTH,
                               "streaming_growth_x_chunk": TARGET_STREAM_GROWTH_CHUNKS}}
        results["sizes"] = [bench_size(s, args.reps, workdir) for s in args.sizes]
        if not args.no_interference:
            results["interference"] = bench_interference(args, workdir)
        machine["loadavg_end"] = loadavg()
        groups = [s["comparisons"] for s in results["sizes"]]
        groups.append(results.get("interference", {}).get("comparisons", []))
        results["all_targets_met"] = all(c["met"] for g in groups for c in g if c["met"] is not None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nall targets met: {results['all_targets_met']}; results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
