"""Lightning's ModelParallelStrategy with ckptio's sharded checkpoints
(ckptio.lightning.ModelParallelStrategy): a real Trainer, 2 processes
(gloo) on the CPU, FSDP2's fully_shard. Saves are asynchronous (dcp.async_save
through ckptio's StorageWriter), a resume restores every tensor exactly, the
directories read with stock DCP, and stock Lightning's sharded checkpoints
read with ckptio's strategy."""

import os

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import leftover_temporaries, run_fit_script


def _run(*args):
    return run_fit_script("sharded_fit.py", *args)


def _assert_same_state(a, b):
    flat_a, spec_a = pytree.tree_flatten(a)
    flat_b, spec_b = pytree.tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y)
        else:
            assert x == y


def _checkpoint_dirs(root):
    return sorted(os.listdir(root / "checkpoints"))


@pytest.mark.parametrize("namespace", ["pytorch_lightning"])
def test_a_stock_lightning_sharded_checkpoint_resumes_with_ckptio(tmp_path, namespace):
    _run("fit", "stock", tmp_path / "a", tmp_path / "fit.pt", "-", namespace)
    newest = tmp_path / "a" / "checkpoints" / "step=5.ckpt"
    _run("resume", "ckptio", tmp_path / "b", tmp_path / "resumed.pt", newest, namespace)
    fit, resumed = torch.load(tmp_path / "fit.pt", weights_only=False), torch.load(tmp_path / "resumed.pt",
                                                                                     weights_only=False)
    _assert_same_state(resumed["model"], fit["model"])
    _assert_same_state(resumed["optimizer"], fit["optimizer"])


def test_a_save_from_a_signal_handler_is_whole_before_the_process_is_killed(tmp_path):
    """As SLURM's --signal=USR1: every rank saves from its signal handler,
    then ends at once (os._exit: no exit hooks, no teardown). The save
    returned only once every rank's files, .metadata and meta.pt were
    durable: the directory holds the state at the signal, read by stock DCP."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    _run("preempt", "ckptio", tmp_path / "a", tmp_path / "at_signal.pt")
    saved = tmp_path / "a" / "preempted.ckpt"
    assert sorted(os.listdir(saved)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert torch.load(saved / "meta.pt", weights_only=True)["global_step"] == 3
    at_signal = torch.load(tmp_path / "at_signal.pt", weights_only=False)
    dcp_to_torch_save(saved, tmp_path / "stock.pt")
    stock = torch.load(tmp_path / "stock.pt", weights_only=False)
    _assert_same_state(stock["state_dict"], at_signal["model"])


def test_saved_over_a_sharded_directory_is_whole_again_once_durable(tmp_path):
    """In one process (no process group: DCP without collectives). meta.pt,
    what makes the directory a checkpoint to Lightning, is gone while it is
    saved over and back, new, once the save is durable."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    import ckptio.lightning

    strategy = ckptio.lightning.ModelParallelStrategy()
    path = tmp_path / "ckpt"
    for epoch in (1, 2):
        w = torch.arange(1 << 16, dtype=torch.float32) * epoch
        strategy.save_checkpoint({"state_dict": {"w": w}, "optimizer_states": [], "epoch": epoch}, path)
        w.fill_(-1.0)  # the snapshot was taken: this is not saved
        if (path / "meta.pt").exists():  # never the old one: it went before the save began, the new one comes last
            assert torch.load(path / "meta.pt", weights_only=True)["epoch"] == epoch
        strategy.wait_for_checkpoints()
        assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "meta.pt"]
        assert torch.load(path / "meta.pt", weights_only=True)["epoch"] == epoch
        dcp_to_torch_save(path, tmp_path / "stock.pt")
        assert torch.equal(torch.load(tmp_path / "stock.pt")["state_dict"]["w"],
                           torch.arange(1 << 16, dtype=torch.float32) * epoch)


def test_async_sharded_saves_resume_exactly_from_the_memory_tier_and_read_with_stock_dcp(tmp_path, monkeypatch):
    """memory=2: each rank's files of the 2 newest checkpoints are also kept
    in the checkpoint service's memory tier; a resume reads them from there.
    Stock DCP reads the directory."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from ckptio.dcp_replicas import memory_copies

    monkeypatch.setenv("CKPTIO_SERVICE_DIR", str(tmp_path / "service"))
    monkeypatch.setenv("CKPTIO_SERVICE_IDLE_S", "2")
    monkeypatch.setenv("CKPTIO_MEMORY_KEEP_S", "120")  # kept between the runs, however slow they are
    try:
        _run("fit", "ckptio-memory", tmp_path / "a", tmp_path / "fit.pt")
        fit = torch.load(tmp_path / "fit.pt", weights_only=False)
        # save_top_k=2 by step: ModelCheckpoint removed the oldest after the newer ones were durable.
        assert _checkpoint_dirs(tmp_path / "a") == ["step=3.ckpt", "step=5.ckpt"]
        checkpoints = tmp_path / "a" / "checkpoints"
        newest = checkpoints / "step=5.ckpt"
        assert sorted(os.listdir(newest)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
        assert leftover_temporaries(tmp_path / "a") == []
        assert torch.load(newest / "meta.pt", weights_only=True)["global_step"] == 6  # plain torch.load reads it
        offsets = [info.offset for info in FileSystemReader(newest).read_metadata().storage_data.values()]
        assert len(offsets) > 8 and all(o % 4096 == 0 for o in offsets)  # ckptio's writer: page-aligned archives
        dcp_to_torch_save(newest, tmp_path / "stock.pt")  # DCP's own FileSystemReader
        _assert_same_state(torch.load(tmp_path / "stock.pt", weights_only=False)["state_dict"], fit["model"])
        for kept in (newest, checkpoints / "step=3.ckpt"):
            assert sorted(memory_copies(kept, 2)) == ["__0_0.distcp", "__1_0.distcp"]
        assert memory_copies(checkpoints / "step=1.ckpt", 2) == {}  # the third newest went from RAM too

        _run("resume", "ckptio-memory", tmp_path / "b", tmp_path / "resumed.pt", newest)
        resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
        assert resumed["step"] == fit["step"] == 6 and resumed["tier"] == "memory"
        _assert_same_state(resumed["model"], fit["model"])
        _assert_same_state(resumed["optimizer"], fit["optimizer"])
    finally:
        from conftest import service_pids

        for pid in service_pids(tmp_path / "service"):
            os.kill(pid, 9)


def test_a_damaged_memory_copy_is_given_up_for_the_file(tmp_path):
    """StorageReader(memory_copies=): an intact copy is read instead of the
    rank file; a copy with the same size and tail but wrong CRCs is warned
    about and the file is read instead (one process, no process group)."""
    import shutil

    import pytest
    import torch.distributed.checkpoint as dcp

    from ckptio.distributed import StorageReader, StorageWriter

    state = {"w": torch.randn(1 << 18, generator=torch.Generator().manual_seed(3)), "b": torch.arange(100)}
    dcp.save(state, storage_writer=StorageWriter(tmp_path / "ckpt"), no_dist=True)
    copy = tmp_path / "memory" / "__0_0.distcp"
    copy.parent.mkdir()
    shutil.copy(tmp_path / "ckpt" / "__0_0.distcp", copy)
    for damaged in (False, True):
        if damaged:
            data = bytearray(copy.read_bytes())
            for i in range(100, len(data) - (1 << 16), 4096):  # before the tail: the same size and tail
                data[i] ^= 0x01
            copy.write_bytes(bytes(data))
        target = {"w": torch.zeros(1 << 18), "b": torch.zeros(100, dtype=torch.int64)}
        reader = StorageReader(tmp_path / "ckpt", memory_copies={"__0_0.distcp": str(copy)})
        if damaged:
            with pytest.warns(RuntimeWarning, match="memory tier's copy .* cannot be read"):
                dcp.load(target, storage_reader=reader, no_dist=True)
        else:
            dcp.load(target, storage_reader=reader, no_dist=True)
        assert torch.equal(target["w"], state["w"]) and torch.equal(target["b"], state["b"])
        assert (reader.files_from_memory, reader.files_from_disk) == \
            ((set(), {"__0_0.distcp"}) if damaged else ({"__0_0.distcp"}, set()))



def test_a_node_lost_resumes_from_its_partners_replica(tmp_path, monkeypatch):
    """replicas=1, two ranks as two "nodes", each with its own service and
    memory tier: each node keeps its rank's files and its partner's replica
    of the 2 newest checkpoints. Node 1 is lost (its service SIGKILLed, its
    RAM and rank 1's file of the newest checkpoint deleted); the resume
    serves rank 1 from node 0's replica, CRC-checked, and every tensor comes
    back exactly."""
    import shutil

    from conftest import service_pids

    from ckptio.dcp_replicas import memory_copies

    monkeypatch.setenv("CKPTIO_SERVICE_IDLE_S", "2")
    monkeypatch.setenv("CKPTIO_MEMORY_KEEP_S", "120")  # kept between the runs, however slow they are
    try:
        _run("fit", "ckptio-replicas", tmp_path / "a", tmp_path / "fit.pt")
        fit = torch.load(tmp_path / "fit.pt", weights_only=False)
        checkpoints = tmp_path / "a" / "checkpoints"
        newest = checkpoints / "step=5.ckpt"
        for node in (0, 1):
            monkeypatch.setenv("CKPTIO_SERVICE_DIR", str(tmp_path / f"node{node}"))
            for kept in (newest, checkpoints / "step=3.ckpt"):  # its own rank's files and its partner's
                assert sorted(memory_copies(kept, 2)) == ["__0_0.distcp", "__1_0.distcp"], node
            assert memory_copies(checkpoints / "step=1.ckpt", 2) == {}

        for pid in service_pids(tmp_path / "node1"):
            os.kill(pid, 9)
        shutil.rmtree(tmp_path / "node1")
        (newest / "__1_0.distcp").unlink()  # only the partner's replica can serve rank 1 now
        _run("resume", "ckptio-replicas", tmp_path / "b", tmp_path / "resumed.pt", newest)
        resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
        tiers = [(tmp_path / f"resumed.pt.tier{rank}").read_text() for rank in (0, 1)]
        assert tiers == ["memory", "partner"] and resumed["step"] == 6
        _assert_same_state(resumed["model"], fit["model"])
        _assert_same_state(resumed["optimizer"], fit["optimizer"])
    finally:
        for pid in service_pids(tmp_path, under=True):
            os.kill(pid, 9)
