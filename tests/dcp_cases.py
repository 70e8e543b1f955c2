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


def run(fn, world, *args):
    """Run fn(rank, world, port, *args) in `world` spawned processes (gloo ranks)."""
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, start_method="spawn", join=True)


def assert_same(a, b, path=""):
    """Bit-exact equality of nested states (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


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

    if kind == "ckptio":
        return StorageWriter(path)
    if kind.endswith("-zstd"):  # DCP's stream transform extension: every item zstd-compressed
        from torch.distributed.checkpoint._extension import ZStandard

        if kind == "ckptio-zstd":
            return StorageWriter(path, _extensions=[ZStandard()])
        return dcp.FileSystemWriter(path, sync_files=True, _extensions=[ZStandard()])
    return dcp.FileSystemWriter(path, sync_files=True)


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


# --- async_save through DCP's checkpoint process, ShardedTensors -------------------


def _stop_checkpoint_process():
    """End DCP's checkpoint daemon (AsyncCheckpointerType.PROCESS) before the
    rank leaves, as its finalizer would at a normal interpreter exit."""
    from torch.distributed.checkpoint import _async_process_executor as ape

    proc = ape._CHECKPOINT_PROCESS
    if proc is not None and proc._save_process.is_alive():
        proc._send(ape._CheckpointSaveProcessControlOpts.TERMINATE)
        proc._save_process.join(timeout=30)
        if proc._save_process.is_alive():
            proc._save_process.terminate()
    ape._CHECKPOINT_PROCESS = None


def async_save_in_process(rank, world, port, path, writer_kind, out):
    """Two dcp.async_save calls with AsyncCheckpointerType.PROCESS through one
    writer: `path` at step 2, then `path`_b at step 5 (the second stage()
    reuses the staging buffer of a writer that was pickled once already).
    rank 0 saves the full states each checkpoint must hold to `out`."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    mesh = _init(rank, world, port)
    model, opt = make_sharded(mesh)
    writer = _writer(writer_kind, path)
    expected = []
    g = torch.Generator().manual_seed(2)
    for step, checkpoint_id in ((2, path), (5, path + "_b")):
        msd, osd = get_state_dict(model, opt)
        expected.append(torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, full_state(model, opt)))
        future = dcp.async_save({"model": msd, "optim": osd, "step": step}, checkpoint_id=checkpoint_id,
                                storage_writer=writer, async_checkpointer_type=AsyncCheckpointerType.PROCESS)
        for _ in range(3):  # training goes on while the checkpoint process writes
            model(torch.randn(8, 64, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        future.result()
    _stop_checkpoint_process()
    if rank == 0:
        torch.save(expected, out)
    _finish()


def make_sharded_tensor(rank, world, rows=8, cols=6, seed=7):
    """A ShardedTensor (FSDP(1) SHARDED_STATE_DICT style: row shards, one per
    rank, no device mesh) and the full tensor it shards."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    full = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    per = rows // world
    md = ShardMetadata(shard_offsets=[rank * per, 0], shard_sizes=[per, cols], placement=f"rank:{rank}/cpu")
    return init_from_local_shards([Shard(full[rank * per:(rank + 1) * per].clone(), md)], [rows, cols]), full


def async_save_sharded_tensor(rank, world, port, path, mode, out):
    """async_save (THREAD or PROCESS) of a ShardedTensor plus a plain tensor
    through ckptio's writer; the shards are overwritten as soon as
    async_save returns. Then dcp.load into a fresh ShardedTensor through
    ckptio's reader and check it holds the values at save time."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    from ckptio.distributed import StorageReader, StorageWriter

    _init(rank, world, port)
    st, full = make_sharded_tensor(rank, world)
    bias = torch.arange(5.0)
    kind = AsyncCheckpointerType.PROCESS if mode == "process" else AsyncCheckpointerType.THREAD
    future = dcp.async_save({"layer": {"weight": st, "bias": bias}, "step": 3}, storage_writer=StorageWriter(path),
                            async_checkpointer_type=kind)
    st.local_shards()[0].tensor.fill_(-1.0)  # the snapshot was taken: this must not reach the checkpoint
    bias.fill_(-1.0)
    future.result()
    _stop_checkpoint_process()

    fresh, _ = make_sharded_tensor(rank, world, seed=99)
    state = {"layer": {"weight": fresh, "bias": torch.zeros(5)}, "step": 0}
    dcp.load(state, storage_reader=StorageReader(path))
    per = full.shape[0] // world
    assert torch.equal(state["layer"]["weight"].local_shards()[0].tensor, full[rank * per:(rank + 1) * per])
    assert torch.equal(state["layer"]["bias"], torch.arange(5.0))
    assert state["step"] == 3
    if rank == 0:
        torch.save(full, out)
    _finish()


# --- loads expected to succeed or fail, one report per rank ----------------------


class Note:
    """A user class in a BYTES item: not allowed weights-only unless trusted."""

    def __init__(self, text="note"):
        self.text = text


def _template(kind, mesh):
    if kind == "model":
        model, opt = make_sharded(mesh, seed=123)
        msd, osd = get_state_dict(model, opt)
        return {"model": msd, "optim": osd, "step": 0}, (model, opt)
    if kind == "simple":
        return {"w": torch.zeros(8), "step": 0}, None
    if kind == "evil":
        return {"w": torch.zeros(8), "evil": 0}, None
    if kind == "note":
        return {"w": torch.zeros(8), "note": 0}, None
    if kind == "fixture":
        import io

        return {"a": torch.zeros(4, 3), "b": torch.zeros(6, dtype=torch.int32),
                "nested": {"x": 0, "s": "", "f": 0.0}, "raw": io.BytesIO()}, None
    raise ValueError(kind)


def _plain(v):
    """A loaded value as plain Python, for a report."""
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if hasattr(v, "getvalue"):
        return v.getvalue()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return getattr(v, "text", v)


def load_cases(rank, world, port, cases, out_dir):
    """For each (name, path, template, trusted_globals): dcp.load through
    ckptio's reader; rank writes out_dir/<name>.<rank>.txt with "OK <what
    was loaded>" or the exception text. "model" loads also save the loaded
    full state (rank 0) to out_dir/<name>.pt."""
    from ckptio.distributed import StorageReader

    mesh = _init(rank, world, port)
    for name, path, template, trusted in cases:
        state, owner = _template(template, mesh)
        safe = [Note] if trusted else []
        try:
            dcp.load(state, storage_reader=StorageReader(path, safe_globals=safe))
            if owner is not None:
                model, opt = owner
                set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
                if rank == 0:
                    torch.save({"full": full_state(model, opt), "step": state["step"]},
                               os.path.join(out_dir, f"{name}.pt"))
                report = f"OK step={state['step']}"
            else:
                report = "OK " + repr({k: _plain(v) for k, v in state.items()})
        except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
            report = f"ERROR {type(e).__name__}: {e}"
        with open(os.path.join(out_dir, f"{name}.{rank}.txt"), "w") as f:
            f.write(report)
    _finish()


# --- a checkpoint written by an older torch ---------------------------------------

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "dcp_torch2.9")


def fixture_state():
    """What the committed fixture holds (no RNG: the same in every torch)."""
    import io

    return {"a": torch.arange(12, dtype=torch.float32).reshape(4, 3) / 7, "b": torch.arange(6, dtype=torch.int32),
            "nested": {"x": 1, "s": "hi", "f": 2.5}, "raw": io.BytesIO(b"hello")}


def make_fixture(directory=FIXTURE_DIR):
    """Write the fixture with DCP's stock FileSystemWriter of the torch that
    runs this. The committed one came from torch 2.9.0:
    ``<python with torch 2.9> tests/dcp_cases.py make-fixture``."""
    dcp.save(fixture_state(), storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
    with open(os.path.join(directory, "TORCH_VERSION"), "w") as f:
        f.write(torch.__version__ + "\n")


if __name__ == "__main__" and sys.argv[1:2] == ["make-fixture"]:
    make_fixture(*sys.argv[2:3])
