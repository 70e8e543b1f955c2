"""Benchmark how long ckptio's async saves block training, and what they cost.

The stall against a warm copy_ of the state, the time until durable, training-loop interference and peak
memory. Methodology, baselines and targets: bench/README.md, "Async saves".

Usage: python bench/async_stall.py [--sizes 1,4] [--reps 5] [--dir D] [--json F]
                                   [--interference-size 1] [--steps 200] [--every 10]
       python bench/async_stall.py --quick      # 0.25 GiB, 3 reps, 60 steps
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import namedtuple

import _common as common
import numpy as np
import torch
from _common import Op, comparison, median

import ckptio

# Targets from the issue.
TARGET_STALL_VS_COPY = 1.15        # ckptio.async_save stall / warm copy_ of the state
TARGET_TRAIN_MEAN = 1.10           # mean step time with ckptio saves / without saves
TARGET_STAGED_GROWTH = 2.20        # peak RSS growth / state bytes (two staging slots + 10%)
TARGET_STREAM_GROWTH_CHUNKS = 2.2  # peak RSS growth / chunk bytes (two chunks + 10%)

STREAM_ENV = {"CKPTIO_STAGING_BUDGET_MB": "64", "CKPTIO_CHUNK_MB": "64"}
MEMORY_MODES = {"staged": {}, "streaming": STREAM_ENV, "staged, 1 slot": {"CKPTIO_STAGING_SLOTS": "1"}}
TARGET_STEP_S = 0.050  # training step length the loop is calibrated to


# timed_save()'s record: what save(path) returned, seconds until it returned, until wait() returned, what it returned
Saved = namedtuple("Saved", "handle returned_s done_s result")


def timed_save(save, wait, path: str) -> Saved:
    """Sync (a previous save's writeback lands in no timing), save(path), wait(what it returned), delete the file."""
    os.sync()
    t0 = time.perf_counter()
    handle = save(path)
    returned = time.perf_counter() - t0
    result = wait(handle)
    done = time.perf_counter() - t0
    common.remove(path)
    return Saved(handle, returned, done, result)


def lightning_async_io():
    from lightning.fabric.plugins import TorchCheckpointIO
    from lightning.pytorch.plugins.io import AsyncCheckpointIO as LAsync

    return LAsync(TorchCheckpointIO())


def awaited_saves(save, wait, path_prefix: str, reps: int, done_key: str) -> dict:
    """A warm-up and `reps` timed saves, each awaited before the next: their stalls as a measurement,
    and under `done_key` the time until wait() returned."""
    warm, *runs = [timed_save(save, wait, f"{path_prefix}-{rep}") for rep in ["warmup", *range(reps)]]
    return {**common.timing([r.returned_s for r in runs]), done_key: [r.done_s for r in runs],
            "warmup": {"stall_s": warm.returned_s, done_key: warm.done_s}}


# --- Workers: stall and durable time (one process per size and backend) ------
def worker_ckptio(p: dict) -> dict:
    from ckptio.config import staging_config

    sd = common.make_state_dict(p["size_gib"])
    out = {"state_dict": common.describe_state_dict(sd), "torch_num_threads": torch.get_num_threads()}

    # Baseline: copy_ of every tensor into a preallocated, already-touched copy.
    # Its reps are interleaved with ckptio's (a busy machine then weighs on
    # both) when RAM holds the state, the copy and every staging slot;
    # otherwise they run first and the copy is freed before the arena exists.
    interleave = common.mem_available() > (1 + staging_config().slots) * out["state_dict"]["bytes"] + common.GIB
    dst = {k: torch.empty_like(t) for k, t in sd.items()}

    def copy_all(rep):
        for k, t in sd.items():
            dst[k].copy_(t)

    copy = Op("copy_", copy_all)
    if not interleave:
        common.measure([copy], p["reps"])
        del dst
        gc.collect()

    plugin = ckptio.AsyncCheckpointIO()
    calls = {"async": [], "plugin": [], "sync": []}  # every call's timed_save(), the warm-up's first

    def saving(kind, save, wait):
        def run(rep):
            calls[kind].append(timed_save(save, wait, os.path.join(p["workdir"], f"{kind}-{rep}.ckpt")))
        return Op(kind, run)

    # One untimed warm-up each (the warm-up async_save allocates and faults one
    # staging slot; its numbers are kept for the record), then round-robin.
    common.measure(([copy] if interleave else []) + [
        saving("async", lambda path: ckptio.async_save(sd, path), lambda h: h.result()),
        saving("plugin", lambda path: plugin.save_checkpoint(sd, path), lambda h: h.result()),
        saving("sync", lambda path: ckptio.save(sd, path), lambda result: result)], p["reps"])
    plugin.teardown()

    def warmup(kind):
        warm = calls[kind][0]
        return {"stall_s": warm.handle.stall_seconds, "returned_s": warm.returned_s, "durable_s": warm.done_s,
                "mode": warm.handle.mode}

    (_, *asyncs), (_, *plugins), (_, *syncs) = calls["async"], calls["plugin"], calls["sync"]
    out["copy_"] = common.timing(copy.times, interleaved=interleave)
    out["ckptio.async_save"] = common.timing(
        [c.handle.stall_seconds for c in asyncs],
        call_returned_s=[c.returned_s for c in asyncs],  # wall time of the call, cross-check of stall_seconds
        modes=[c.handle.mode for c in asyncs], direct_io=[c.result.direct_io for c in asyncs])
    out["ckptio.AsyncCheckpointIO"] = common.timing([c.handle.stall_seconds for c in plugins],
                                                    durable_s=[c.done_s for c in plugins])
    out["durable"] = {
        "ckptio.save": common.timing([c.returned_s for c in syncs], direct_io=[c.result.direct_io for c in syncs]),
        "ckptio.async_save": common.timing([c.done_s for c in asyncs])}
    out["warmup"] = {"ckptio.async_save": warmup("async"), "ckptio.AsyncCheckpointIO": warmup("plugin"),
                     "ckptio.save": {"seconds": calls["sync"][0].returned_s}}
    return out


def worker_lightning(p: dict) -> dict:
    sd = common.make_state_dict(p["size_gib"])
    io = lightning_async_io()
    # teardown waits for the write (not fsynced: TorchCheckpointIO doesn't)
    saves = awaited_saves(lambda path: io.save_checkpoint(sd, path), lambda _: io.teardown(),
                          os.path.join(p["workdir"], "lightning"), p["reps"], "written_s")
    return {"Lightning AsyncCheckpointIO": {**saves, "durable": False}}


def worker_dcp(p: dict) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(p["workdir"], "dcp-store"), 1),
                            rank=0, world_size=1)
    try:
        sd = common.make_state_dict(p["size_gib"])
        saves = awaited_saves(lambda path: dcp.async_save(sd, checkpoint_id=path), lambda fut: fut.result(),
                              os.path.join(p["workdir"], "dcp"), p["reps"], "completed_s")
    finally:
        dist.destroy_process_group()
    return {"torch.distributed.checkpoint.async_save": saves}


# --- Worker: peak resident memory during async saves (env set by the parent) -
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    """The peak RSS, sampled every 5 ms until stop(): a cross-check of VmHWM."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.samples, self.done = 0, 0, threading.Event()
        self.start()

    def run(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


def worker_memory(p: dict) -> dict:
    from ckptio.config import staging_config

    cfg = staging_config()
    sd = common.make_state_dict(p["size_gib"])
    gc.collect()
    time.sleep(0.2)
    base = rss_bytes()
    try:  # VmHWM back to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset_error = None
    except OSError as exc:
        hwm_reset_error = f"cannot write /proc/self/clear_refs: {exc.strerror}"
    sampler = RssSampler()
    saves = []
    for rep in range(p["reps"]):
        path = os.path.join(p["workdir"], f"mem-{p['mode']}-{rep}.ckpt")
        t0 = time.perf_counter()
        h = ckptio.async_save(sd, path)
        res = h.result()
        saves.append({"mode": h.mode, "stall_s": h.stall_seconds, "durable_s": time.perf_counter() - t0,
                      "rss_growth_after_bytes": rss_bytes() - base,
                      "sampled_peak_growth_so_far_bytes": sampler.peak - base,
                      "block_bytes": res.block_bytes, "direct_io": res.direct_io})
        common.remove(path)
    sampled_growth = sampler.stop() - base
    hwm = common.proc_field("/proc/self/status", "VmHWM")  # "1234 kB"
    hwm_growth = None if hwm_reset_error or hwm is None else int(hwm.split()[0]) * 1024 - base
    return {
        "mode": p["mode"], "env": p["env"], "state_bytes": sum(t.nbytes for t in sd.values()),
        "staging_config": {"slots": cfg.slots, "budget_bytes": cfg.budget_bytes,
                           "chunk_bytes": cfg.chunk_bytes, "max_pending": cfg.max_pending},
        "rss_after_state_bytes": base,
        "peak_growth_bytes": sampled_growth if hwm_growth is None else max(hwm_growth, sampled_growth),
        "vmhwm_growth_bytes": hwm_growth, "vmhwm_reset_error": hwm_reset_error,
        "sampled_peak_growth_bytes": sampled_growth, "samples": sampler.samples,
        "saves": saves,
    }


# --- Workers: training interference ------------------------------------------
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

    def step_times(inner: int, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            train_step(layers, opt, xs, inner)
            times.append(time.perf_counter() - t0)
        return times

    probe = 8
    step_times(probe, 10)
    times = step_times(probe, 15)
    inner = max(1, round(TARGET_STEP_S / (median(times) / probe)))
    for _ in range(2):  # refine: a step also has a fixed cost (backward, optimizer)
        inner = max(1, round(inner * TARGET_STEP_S / median(step_times(inner, 7))))
    check = step_times(inner, 10)
    return {"inner": inner, "probe_inner": probe, "probe_step_s": times, "check_step_s": check,
            "check_median_s": median(check)}


def worker_train(p: dict) -> dict:
    torch.set_num_threads(1)  # the same for every variant: one core trains, one is left for I/O
    variant, steps, every, inner = p["variant"], p["steps"], p["every"], p["inner"]
    layers, opt, xs = build_training()
    ckpt_state = None
    if variant != "none":
        ckpt_state = {"model": layers.state_dict(), "state": common.make_state_dict(p["size_gib"], seed=1)}
    paths = [os.path.join(p["workdir"], f"train-{variant}-{i}.ckpt") for i in range(3)]
    handles, save, drain = [], None, (lambda: None)
    if variant == "ckptio":
        save, drain = (lambda path: handles.append(ckptio.async_save(ckpt_state, path))), ckptio.wait
    elif variant == "lightning":
        io = lightning_async_io()
        save, drain = (lambda path: io.save_checkpoint(ckpt_state, path)), io.teardown

    def checkpoint(k: int):
        save(paths[k % len(paths)])

    for _ in range(p["warmup_steps"]):
        train_step(layers, opt, xs, inner)
    warm_ckpt = None
    if variant != "none":  # one untimed warm-up checkpoint, drained
        t0 = time.perf_counter()
        checkpoint(-1)
        warm_ckpt = {"call_s": time.perf_counter() - t0}
        drain()
        warm_ckpt["drained_s"] = time.perf_counter() - t0
        handles.clear()
        os.sync()

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
        out["checkpoint_bytes_in_tensors"] = sum(t.nbytes for part in ckpt_state.values() for t in part.values())
    if variant == "ckptio":
        out["stall_s"] = [h.stall_seconds for h in handles]
        out["modes"] = sorted({h.mode for h in handles})
        out["write_s"] = [h.result().write_seconds for h in handles]
    for path in paths:
        common.remove(path)
    return out


WORKERS = {"ckptio": worker_ckptio, "lightning": worker_lightning, "dcp": worker_dcp,
           "memory": worker_memory, "calibrate": worker_calibrate, "train": worker_train}


# --- Orchestration -----------------------------------------------------------
STALL_WORKERS = {"ckptio": "stall and durable time, ckptio (copy_ baseline, async_save, plugin, save)",
                 "lightning": "stall, Lightning AsyncCheckpointIO",
                 "dcp": "stall, torch.distributed.checkpoint.async_save"}


def bench_size(size_gib: float, reps: int, workdir: str) -> dict:
    params = {"size_gib": size_gib, "reps": reps}
    print()
    runs = {}
    for kind, what in STALL_WORKERS.items():
        print(f"== {size_gib:g} GiB: {what} ...", flush=True)
        runs[kind] = common.run_worker(kind, params, workdir)
    ck, light, dcp = runs["ckptio"], runs["lightning"], runs["dcp"]
    memory = {}
    for mode, env in MEMORY_MODES.items():
        print(f"== {size_gib:g} GiB: peak memory, {mode} ({env or 'default settings'}) ...", flush=True)
        memory[mode] = common.run_worker("memory", {**params, "mode": mode, "env": env}, workdir, env)

    result = {
        "size_gib": size_gib,
        "state_dict": ck.get("state_dict"),
        "stall": {"copy_ (warm, preallocated)": ck.get("copy_"),
                  "ckptio.async_save": ck.get("ckptio.async_save"),
                  "ckptio.AsyncCheckpointIO": ck.get("ckptio.AsyncCheckpointIO"),
                  "Lightning AsyncCheckpointIO": light.get("Lightning AsyncCheckpointIO"),
                  "torch.distributed.checkpoint.async_save": dcp.get("torch.distributed.checkpoint.async_save")},
        "durable": ck.get("durable"),
        "warmup": ck.get("warmup"),
        "memory": memory,
        "errors": {kind: r["error"] for kind, r in runs.items() if "error" in r}
                  | {f"memory {mode}": m["error"] for mode, m in memory.items() if "error" in m},
    }
    result["comparisons"] = size_comparisons(result)
    return result


def size_comparisons(r: dict) -> list[dict]:
    stall, base = r["stall"], r["stall"]["copy_ (warm, preallocated)"]
    out = [comparison("stall vs copy_", name, m["median_s"] / base["median_s"] if base and m else None,
                      TARGET_STALL_VS_COPY if name == "ckptio.async_save" else None, higher_is_better=False)
           for name, m in list(stall.items())[1:]]
    d = r["durable"]
    if d:
        out.append(comparison("durable time vs ckptio.save", "ckptio.async_save (call to result)",
                              d["ckptio.async_save"]["median_s"] / d["ckptio.save"]["median_s"],
                              None, higher_is_better=False))
    for mode, target, unit in (("staged", TARGET_STAGED_GROWTH, "x state"),
                               ("streaming", TARGET_STREAM_GROWTH_CHUNKS, "x chunk"),
                               ("staged, 1 slot", None, "x state")):
        m = r["memory"].get(mode) or {"error": "not run"}
        value = None
        if "error" not in m:
            value = m["peak_growth_bytes"] / (m["state_bytes"] if unit == "x state"
                                              else m["staging_config"]["chunk_bytes"])
        c = comparison(f"peak RSS growth ({mode})", f"memory: {mode}", value, target, higher_is_better=False, unit=unit)
        if mode == "streaming" and value is not None and any(s["mode"] != "streaming" for s in m["saves"]):
            c["met"] = None  # the state fits the budget: nothing streamed, no verdict
            c["note"] = "not streamed (state <= CKPTIO_STAGING_BUDGET_MB)"
        out.append(c)
    return out


TRAIN_VARIANTS = {"none": "no checkpoints", "ckptio": "ckptio.async_save", "lightning": "Lightning AsyncCheckpointIO"}


def bench_interference(args, workdir: str) -> dict:
    print(f"\n== training interference: calibrating a ~{TARGET_STEP_S * 1e3:.0f} ms step ...", flush=True)
    cal = common.run_worker("calibrate", {}, workdir)
    if "error" in cal:
        return {"error": cal["error"], "comparisons": []}
    print(f"   {cal['inner']} micro-batches a step, {cal['check_median_s'] * 1e3:.1f} ms", flush=True)
    params = {"steps": args.steps, "every": args.every, "warmup_steps": args.warmup_steps,
              "inner": cal["inner"], "size_gib": args.interference_size}
    variants = {}
    for variant, title in TRAIN_VARIANTS.items():
        print(f"== training: {title}, {args.steps} steps"
              + ("" if variant == "none" else f", {args.interference_size:g} GiB every {args.every}")
              + " ...", flush=True)
        variants[variant] = common.run_worker("train", {**params, "variant": variant}, workdir)
    base, comps = variants["none"], []
    for variant, target in (("ckptio", TARGET_TRAIN_MEAN), ("lightning", None)):
        v = variants[variant]
        for stat, tgt in (("mean", target), ("p99", None)):
            value = None if "error" in v or "error" in base else v[f"{stat}_s"] / base[f"{stat}_s"]
            comps.append(comparison(f"{stat} step time vs no checkpoints",
                                    f"training: {TRAIN_VARIANTS[variant]} ({stat})", value, tgt,
                                    higher_is_better=False))
    return {"calibration": cal, "config": params, "variants": variants, "comparisons": comps}


# --- Report ------------------------------------------------------------------
def _secs(m: dict | None) -> str:
    if not m or m.get("median_s") is None:
        return "error"
    v = m["median_s"]
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.3f} s"


def _bytes(n: int) -> str:
    return f"{n / common.GIB:.3f} GiB" if abs(n) >= common.GIB else f"{n / common.MIB:.1f} MiB"


def table_rows(results: dict) -> list[tuple]:
    def row(name, value, c):
        return (name, value, *common.cells(c))

    rows = []
    for size in results["sizes"]:
        tag = f"[{size['size_gib']:g} GiB]"
        comps = {c["measurement"]: c for c in size["comparisons"]}
        rows += [row(f"{tag} stall: {name}", _secs(m), comps.get(name)) for name, m in size["stall"].items()]
        d = size["durable"] or {}
        rows.append(row(f"{tag} durable: ckptio.save", _secs(d.get("ckptio.save")), None))
        rows.append(row(f"{tag} durable: ckptio.async_save (call to result)", _secs(d.get("ckptio.async_save")),
                        comps.get("ckptio.async_save (call to result)")))
        rows += [row(f"{tag} memory: {mode}, RSS growth",
                     "error" if "error" in m else f"{_bytes(m['peak_growth_bytes'])} (peak)", comps[f"memory: {mode}"])
                 for mode, m in size["memory"].items()]
    inter = results.get("interference")
    if inter:
        size = inter.get("config", {}).get("size_gib")
        tag = f"[train, {size:g} GiB/{inter['config']['every']} steps]" if size is not None else "[train]"
        comps = {c["measurement"]: c for c in inter["comparisons"]}
        for variant, title in TRAIN_VARIANTS.items():
            m = inter.get("variants", {}).get(variant, {"error": inter.get("error")})
            for stat in ("mean", "p99"):
                rows.append(row(f"{tag} training: {title} ({stat} step)",
                                "error" if "error" in m else f"{m[stat + '_s'] * 1e3:.1f} ms",
                                comps.get(f"training: {title} ({stat})")))
    return rows


def report(results: dict) -> None:
    common.print_table(("measurement", "median", "ratio vs baseline", "target", "met?"), table_rows(results))
    print("\nmemory rows: the largest RSS growth over all saves, not a median; growth is above the RSS\n"
          "right after the state was allocated. Training rows: mean / p99 over all timed steps.")
    for size in results["sizes"]:
        tag = f"[{size['size_gib']:g} GiB]"
        a = (size.get("warmup") or {}).get("ckptio.async_save")
        stalls = (size["stall"].get("ckptio.async_save") or {}).get("times_s") or []
        if a:
            print(f"{tag} ckptio.async_save: warm-up stall {a['stall_s']:.3f} s, "
                  f"timed stalls {', '.join(f'{s:.3f}' for s in stalls)} s")
        for mode, m in size["memory"].items():
            if "error" not in m:
                print(f"{tag} memory {mode}: RSS growth after each save "
                      f"{', '.join(_bytes(s['rss_growth_after_bytes']) for s in m['saves'])}; "
                      f"modes {sorted({s['mode'] for s in m['saves']})}")
        if size.get("errors"):
            print(f"{tag} errors: {size['errors']}")
    for variant, m in (results.get("interference") or {}).get("variants", {}).items():
        if "error" not in m and m.get("checkpoint_call_s"):
            print(f"[train] {variant}: {len(m['checkpoint_call_s'])} checkpoints, save call "
                  f"median {median(m['checkpoint_call_s']) * 1e3:.0f} ms / max "
                  f"{max(m['checkpoint_call_s']) * 1e3:.0f} ms; drain after the loop {m['drain_s']:.2f} s")
    print(common.machine_line(results["machine"], f"lightning {results['machine'].get('lightning')}"))


def parse_args(argv=None):
    p = common.parser(__doc__, "async_stall.json", reps=5, min_reps=3)
    p.add_argument("--sizes", type=common.sizes_arg, default="1,4",
                   help="comma-separated state sizes in GiB (fractions allowed), default 1,4")
    p.add_argument("--interference-size", type=float, default=1.0,
                   help="GiB of the state checkpointed during the training loop, default 1")
    p.add_argument("--steps", type=int, default=200, help="timed training steps per variant, default 200")
    p.add_argument("--every", type=int, default=10, help="checkpoint every N training steps, default 10")
    p.add_argument("--warmup-steps", type=int, default=20, help="untimed training steps first, default 20")
    p.add_argument("--no-interference", action="store_true", help="skip the training-loop measurement")
    p.add_argument("--quick", action="store_true",
                   help="a quick check: --sizes 0.25 --reps 3 --interference-size 0.25 --steps 60")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.reps, args.interference_size, args.steps = [0.25], 3, 0.25, 60
    if args.interference_size <= 0:
        p.error("sizes must be positive numbers of GiB")
    if args.steps < 1 or args.every < 1 or args.warmup_steps < 0:
        p.error("--steps and --every must be >= 1")
    return args


def main(argv=None) -> int:
    common.serve_worker(WORKERS)
    args = parse_args(argv)
    with common.temp_workdir(args.dir, ".ckptio-bench-") as wd:
        machine = common.machine_info(wd)
        try:
            import lightning
            machine["lightning"] = lightning.__version__
        except ImportError as exc:
            machine["lightning"] = f"unavailable: {exc}"
        machine["loadavg_start"] = common.start_loadavg()
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
        results["sizes"] = [bench_size(s, args.reps, wd) for s in args.sizes]
        if not args.no_interference:
            results["interference"] = bench_interference(args, wd)
        machine["loadavg_end"] = common.loadavg()
        results["all_targets_met"] = common.all_met(results.get("interference", {}).get("comparisons", []),
                                                    *(s["comparisons"] for s in results["sizes"]))
    report(results)
    common.write_json(args.json, results)
    print(f"\nall targets met: {results['all_targets_met']}; results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
