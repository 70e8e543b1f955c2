"""Fresh-memory ckptio.load under each read technique the engine has, cold cache, against dd iflag=direct.

Methodology: bench/README.md, "read_techniques.py".

Usage: python bench/read_techniques.py [--size-gib 1] [--reps 3] [--dir D] [--json F]
"""

from __future__ import annotations

import os

import _common as common
from _common import Op

import ckptio
from ckptio import _C, _engine
from ckptio.config import engine_config

VARIANTS = {  # name -> (zero_copy_reads, read_prefault)
    "bounce + copy, prefault (default)": (False, True),
    "bounce + copy, no prefault": (False, False),
    "zero-copy O_DIRECT, prefault": (True, True),
    "zero-copy O_DIRECT, no prefault": (True, False),
}


def main(argv=None) -> int:
    p = common.parser(__doc__, "read_techniques.json", reps=3)
    p.add_argument("--size-gib", type=float, default=1.0)
    args = p.parse_args(argv)
    cfg = engine_config()
    with common.temp_workdir(args.dir, ".ckptio-bench-read-") as wd:
        path = os.path.join(wd, "state.ckpt")
        ckptio.save(common.make_state_dict(args.size_gib), path)
        size = os.path.getsize(path)
        cache = common.PageCache()

        def load_with(engine):
            def run(rep):
                _engine._engine = engine  # what ckptio.load uses
                ckptio.load(path)  # dropped at once: freeing the loaded state is inside the timing
            return run

        engines = {name: _C.Engine(cfg.num_threads, cfg.block_bytes, cfg.queue_depth, cfg.direct, zero_copy, prefault)
                   for name, (zero_copy, prefault) in VARIANTS.items()}
        runs = {**{name: load_with(engine) for name, engine in engines.items()},
                "dd read (direct)": lambda rep: common.dd_read(path)}
        ops = [Op(name, run, before=lambda: cache.evict(path)) for name, run in runs.items()]
        try:
            common.measure(ops, args.reps)
        finally:
            _engine.reset_engine()
    dd = ops[-1].median
    results = {"bytes": size, "cache": cache.describe(),
               "variants": {op.name: common.timing(op.times, size, vs_dd=dd / op.median) for op in ops}}
    print(f"\nckptio.load into fresh memory, {size / 2**30:.2f} GiB, cold cache, median of {args.reps}")
    print(f"{'technique':36} {'median s':>9} {'GB/s':>6} {'vs dd':>6}")
    for name, r in results["variants"].items():
        print(f"{name:36} {r['median_s']:>9.3f} {r['gb_per_s']:>6.2f} {r['vs_dd']:>5.2f}x")
    common.write_json(args.json, results, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
