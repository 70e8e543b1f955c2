"""Work each rank does in the DCP tests (imported by spawned processes)."""

import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    return init_device_mesh("cpu", (world,))


def _finish():
    # Leave together: a rank that exits while a peer is still in a collective
    # makes gloo abort that peer. Then leave at once: 1 run in 3 aborted in
    # interpreter teardown ("terminate called without an active exception")
    # after all work and checks were done, which is not what these tests test.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_sharded(mesh, seed=0):
    """A model sharded with FSDP2 over a CPU mesh, plus AdamW state after two steps."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        model(torch.randn(8, 64, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def full_state(model, opt):
    """Every value gathered to full tensors (for comparisons across world sizes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": msd, "optim": osd}


def _writer(kind, path):
    from ckptio.distributed import StorageWriter

    return StorageWriter(path) if kind == "ckptio" else dcp.FileSystemWriter(path, sync_files=True)


def _reader(kind, path):
    from ckptio.distributed import StorageReader

    return StorageReader(path) if kind == "ckptio" else dcp.FileSystemReader(path)


def save(rank, world, port, path, writer_kind, out):
    mesh = _init(rank, world, port)
    model, opt = make_sharded(mesh)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "step": 2}, storage_writer=_writer(writer_kind, path))
    full = full_state(model, opt)
    if rank == 0:
        torch.save(full, out)
    _finish()


def load(rank, world, port, path, reader_kind, out):
    mesh = _init(rank, world, port)
    model, opt = make_sharded(mesh, seed=123)  # different values: the load must replace them
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": 0}
    dcp.load(state, storage_reader=_reader(reader_kind, path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    full = full_state(model, opt)
    if rank == 0:
        torch.save({"full": full, "step": state["step"]}, out)
    _finish()


def async_save(rank, world, port, path, writer_kind, out):
    mesh = _init(rank, world, port)
    model, opt = make_sharded(mesh)
    msd, osd = get_state_dict(model, opt)
    # Cloned: full_state hands back some live tensors (the optimizer's step).
    expected = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, full_state(model, opt))
    # The checkpoint's collectives run in the background: give them their own
    # process group so they never interleave with training's (as DCP advises).
    checkpoint_group = dist.new_group(backend="gloo")
    future = dcp.async_save({"model": msd, "optim": osd, "step": 2}, storage_writer=_writer(writer_kind, path),
                            process_group=checkpoint_group)
    # Training goes on (and changes the parameters) while the checkpoint is written.
    for _ in range(3):
        model(torch.randn(8, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    future.result()
    if rank == 0:
        torch.save(expected, out)
    _finish()


def save_and_hang_in_write(rank, world, port, path, marker_dir, _out):
    """Rank 1 announces it is inside write_data and waits there to be killed."""
    from ckptio.distributed import StorageWriter

    class SlowWriter(StorageWriter):
        def write_data(self, plan, planner):
            if dist.get_rank() == 1:
                with open(os.path.join(marker_dir, f"in_write.{os.getpid()}"), "w"):
                    pass
                time.sleep(600)
            return super().write_data(plan, planner)

    mesh = _init(rank, world, port)
    model, opt = make_sharded(mesh)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=SlowWriter(path))
