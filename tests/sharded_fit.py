"""A 2-process (gloo, CPU) Lightning fit with ModelParallelStrategy and
FSDP2's fully_shard, for tests/test_lightning_sharded.py. Lightning's
launcher runs this script again for rank 1.

    python sharded_fit.py fit|resume|preempt STRATEGY ROOT OUT [CKPT] [NAMESPACE]

STRATEGY: "ckptio" (ckptio.lightning.ModelParallelStrategy), "ckptio-memory"
(the same, memory=2), "ckptio-replicas" (memory=2, replicas=1, each rank
a "node" with its own service directory ROOT/../node<rank>) or "stock"
(Lightning's own). fit: 6 steps, a sharded checkpoint every 2 (the newest 2
kept, by step), under ROOT/checkpoints; OUT gets the full model and
optimizer state at the end. resume: fit from CKPT (one step more); OUT
gets the full state as restored, before that step. preempt: at step 3 each
rank signals itself (SIGUSR1); the handler dumps the state to OUT, saves
ROOT/preempted.ckpt and ends the process with os._exit (no exit hooks).
"""

import importlib
import os
import signal
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from lightning_models import step_model_class
from torch.distributed.fsdp import fully_shard

mode, kind, root, out = sys.argv[1:5]
ckpt = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "-" else None
namespace = sys.argv[6] if len(sys.argv) > 6 else "lightning"
pl = importlib.import_module("lightning.pytorch" if namespace == "lightning" else "pytorch_lightning")


class Model(step_model_class(pl)):
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.layers:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.layers, mesh=mesh)

    def _dump(self):
        msd, osd = get_state_dict(self, self.trainer.optimizers,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.global_rank == 0:
            torch.save({"model": msd, "optimizer": osd, "step": self.global_step,
                        "tier": getattr(self.trainer.strategy, "last_loaded_tier", None)}, out)

    def on_train_start(self):
        if mode == "resume":
            self._dump()
            with open(f"{out}.tier{self.global_rank}", "w") as f:  # where this rank's files came from
                f.write(str(self.trainer.strategy.last_loaded_tier))

    def on_train_end(self):
        if mode == "fit":
            self._dump()

    def on_train_batch_end(self, *args):
        if mode == "preempt" and self.global_step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # each rank: a scheduler's warning before it kills the job


def preempted(signum, frame):
    # As Lightning's SLURM handler: save from inside the handler; then the scheduler kills the job at once.
    model = trainer.lightning_module
    model._dump()
    trainer.save_checkpoint(f"{root}/preempted.ckpt")
    os._exit(0)


if kind == "ckptio-replicas":  # two "nodes" of one rank each: a service (and memory tier) per rank
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    os.environ["CKPTIO_SERVICE_DIR"] = os.path.join(os.path.dirname(os.path.abspath(root)), f"node{rank}")
if kind.startswith("ckptio"):  # "ckptio-memory": the 2 newest checkpoints kept in the memory tier too
    import ckptio.lightning

    replicas = kind == "ckptio-replicas"
    strategy = ckptio.lightning.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                      namespace=namespace, memory=0 if kind == "ckptio" else 2,
                                                      replicas=int(replicas),
                                                      partner=(lambda r, w: (r + 1) % w) if replicas else None)
else:
    strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
checkpoints = pl.callbacks.ModelCheckpoint(dirpath=f"{root}/checkpoints", filename="{step}", monitor="step",
                                           mode="max", save_top_k=2, every_n_train_steps=2)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=7 if mode == "resume" else 6,
                     callbacks=[checkpoints],
                     logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
signal.signal(signal.SIGUSR1, preempted)
trainer.fit(Model(), ckpt_path=ckpt)
