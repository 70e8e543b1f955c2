"""Sharded checkpoints with torch.distributed.checkpoint on ckptio's engine.

Two CPU processes (gloo) shard a model with FSDP2, save model + optimizer
with ckptio's StorageWriter (sync, then async), and load it back with
ckptio's StorageReader, which verifies every CRC-32.

    python examples/dcp_fsdp.py [DIRECTORY]

With DIRECTORY, the checkpoints (step1/, step2/) are written there and kept;
without it, into a new temporary directory that is removed at the end. Either
way the example prints where it wrote.

Lightning's FSDPStrategy and ModelParallelStrategy call DCP themselves (they
bypass CheckpointIO), so this is the way in for them too: see docs/distributed.md.
"""

import os
import shutil
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckptio.distributed import StorageReader, StorageWriter


def build(mesh):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model, opt):
    model(torch.randn(16, 256)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def worker(rank, world, port, directory):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model, opt = build(mesh)
    train_step(model, opt)

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=StorageWriter(os.path.join(directory, "step1")))

    # Async: the writer stages into its own reusable buffer; reuse one writer
    # across saves (checkpoint_id names each) and give DCP its own group.
    writer, group = StorageWriter(os.path.join(directory, "step2")), dist.new_group(backend="gloo")
    model_sd, optim_sd = get_state_dict(model, opt)
    future = dcp.async_save({"model": model_sd, "optim": optim_sd}, storage_writer=writer, process_group=group)
    train_step(model, opt)  # training goes on while it is written
    future.result()

    fresh, fresh_opt = build(mesh)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=StorageReader(os.path.join(directory, "step1")))
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if rank == 0:
        print(f"saved {sorted(os.listdir(os.path.join(directory, 'step1')))}; reloaded and verified on {world} ranks")
    dist.barrier()
    dist.destroy_process_group()


def main():
    keep = len(sys.argv) > 1
    directory = sys.argv[1] if keep else tempfile.mkdtemp(prefix="ckptio-dcp-")
    print(f"checkpoints in {directory}" + ("" if keep else " (removed at the end; pass a directory to keep them)"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(worker, args=(2, port, directory), nprocs=2, start_method="spawn")
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
