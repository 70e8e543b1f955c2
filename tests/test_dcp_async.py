"""dcp.async_save through ckptio's StorageWriter beyond the default thread:
DCP's checkpoint process (AsyncCheckpointerType.PROCESS), and ShardedTensors
(FSDP(1) SHARDED_STATE_DICT style) in the state dict. Real gloo ranks in
spawned processes, real files."""

import os
import pickle

import dcp_cases
import pytest
import torch
from dcp_cases import assert_same, run

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def test_writer_pickles_without_its_staging_buffer_after_stage(tmp_path):
    """DCP sends the writer to its checkpoint process by pickling it; stage()
    has left a native staging buffer and a lock on it by then."""
    from ckptio.distributed import StorageWriter

    writer = StorageWriter(tmp_path / "ckpt")
    staged = writer.stage({"w": torch.arange(10.0), "nested": [torch.ones(3)], "step": 1})
    assert torch.equal(staged["w"], torch.arange(10.0))
    copy = pickle.loads(pickle.dumps(writer))
    assert copy._staging is None and copy._arena is None
    assert copy.path == writer.path and copy.overwrite == writer.overwrite
    assert writer._staging is not None  # the original keeps its buffer for the next stage()
    assert torch.equal(writer.stage({"w": torch.arange(10.0) + 1})["w"], torch.arange(10.0) + 1)


def test_async_save_in_checkpoint_process_round_trips(tmp_path):
    """Two PROCESS-type async_saves of an FSDP2 model + AdamW through one
    ckptio writer while training goes on; both checkpoints load back exactly
    through ckptio's reader."""
    ckpt = str(tmp_path / "ckpt")
    run(dcp_cases.async_save_in_process, 2, ckpt, "ckptio", str(tmp_path / "expected.pt"))
    expected = torch.load(tmp_path / "expected.pt", weights_only=False)
    for path, want, step in ((ckpt, expected[0], 2), (ckpt + "_b", expected[1], 5)):
        assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        run(dcp_cases.load, 2, path, "ckptio", str(tmp_path / "loaded.pt"))
        loaded = torch.load(tmp_path / "loaded.pt", weights_only=False)
        assert_same(loaded["full"], want)
        assert loaded["step"] == step
    # The two checkpoints differ: training went on between them.
    assert not torch.equal(expected[0]["model"]["0.weight"], expected[1]["model"]["0.weight"])


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_save_of_a_sharded_tensor_round_trips(tmp_path, mode):
    """Each rank stages its local shard; the checkpoint holds the values at
    save time (the shards are overwritten right after async_save returns),
    loads back into a ShardedTensor on the same ranks (checked in the ranks)
    and, resharded, into one plain tensor here."""
    import torch.distributed.checkpoint as dcp

    from ckptio.distributed import StorageReader

    ckpt = str(tmp_path / "ckpt")
    run(dcp_cases.async_save_sharded_tensor, 2, ckpt, mode, str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt")
    state = {"layer": {"weight": torch.zeros(8, 6), "bias": torch.zeros(5)}, "step": 0}
    dcp.load(state, storage_reader=StorageReader(ckpt), no_dist=True)
    assert torch.equal(state["layer"]["weight"], full)
    assert torch.equal(state["layer"]["bias"], torch.arange(5.0))
    assert state["step"] == 3
