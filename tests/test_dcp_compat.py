"""ckptio's DCP reader on checkpoints that torch's stock FileSystemWriter wrote
with stream transforms (``_extensions=[ZStandard()]``), and on transforms it
cannot apply. Real gloo ranks in spawned processes, real files."""

import os
import pickle
import shutil

import dcp_cases
import pytest
import torch
from dcp_cases import assert_same, run

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
zstd = pytest.importorskip("zstandard")


def _rewrite_metadata(ckpt, change):
    """Edit a checkpoint's .metadata (written by the test itself: trusted)."""
    path = os.path.join(ckpt, ".metadata")
    with open(path, "rb") as f:
        metadata = pickle.load(f)
    change(metadata)
    with open(path, "wb") as f:
        pickle.dump(metadata, f)


@pytest.mark.parametrize("writer,reader", [("stock-zstd", "ckptio"), ("ckptio-zstd", "ckptio"),
                                           ("ckptio-zstd", "stock")])
def test_zstd_checkpoints_load_exactly(tmp_path, writer, reader):
    """A stock checkpoint written with _extensions=[ZStandard()] loads through
    ckptio's reader; ckptio's writer takes the same _extensions and both
    readers load what it wrote."""
    ckpt = str(tmp_path / "ckpt")
    run(dcp_cases.save, 2, ckpt, writer, str(tmp_path / "saved.pt"))
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        infos = list(pickle.load(f).storage_data.values())
    assert infos and all(i.transform_descriptors == ["stream.zstd/1"] for i in infos)  # really compressed
    run(dcp_cases.load, 2, ckpt, reader, str(tmp_path / "loaded.pt"))
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=False)
    assert_same(loaded["full"], torch.load(tmp_path / "saved.pt", weights_only=False))
    assert loaded["step"] == 2


def test_transforms_that_cannot_be_applied_are_named(tmp_path):
    """An unknown transform raises UnsupportedTransformError naming it and the
    file; a damaged compressed item raises CorruptCheckpointError naming the
    transform, file and item — never "not a zip"."""
    good = str(tmp_path / "good")
    run(dcp_cases.save, 2, good, "stock-zstd", str(tmp_path / "saved.pt"))

    unknown = str(tmp_path / "unknown")
    shutil.copytree(good, unknown)

    def rot13(metadata):
        for info in metadata.storage_data.values():
            info.transform_descriptors = ["stream.rot13/1"]

    _rewrite_metadata(unknown, rot13)

    damaged = str(tmp_path / "damaged")
    shutil.copytree(good, damaged)
    with open(os.path.join(good, ".metadata"), "rb") as f:
        metadata = pickle.load(f)
    # The largest item of rank 1's file: damage the middle of its zstd frame.
    info = max((i for i in metadata.storage_data.values() if i.relative_path == "__1_0.distcp"),
               key=lambda i: i.length)
    rank_file = os.path.join(damaged, "__1_0.distcp")
    with open(rank_file, "r+b") as f:
        data = bytearray(f.read())
        for k in range(8):
            data[info.offset + info.length // 2 + k] ^= 0xFF
        f.seek(0)
        f.write(bytes(data))

    out = tmp_path / "out"
    out.mkdir()
    run(dcp_cases.load_cases, 2, [("unknown", unknown, "model", False), ("damaged", damaged, "model", False)],
        str(out))
    for rank in (0, 1):
        text = (out / f"unknown.{rank}.txt").read_text()
        assert "UnsupportedTransformError" in text and "'stream.rot13/1'" in text, text
        assert ".distcp" in text and "item '" in text, text
    texts = [(out / f"damaged.{rank}.txt").read_text() for rank in (0, 1)]
    for text in texts:
        assert text.startswith("ERROR"), text
        assert "CorruptCheckpointError" in text and "__1_0.distcp" in text and "'stream.zstd/1'" in text, text
        assert "end-of-directory" not in text, text


def test_metadata_with_the_legacy_sharded_tensor_properties_loads(tmp_path):
    """Checkpoints from before DCP had its own TensorProperties pickle
    torch.distributed._shard.sharded_tensor.metadata.TensorProperties (as
    PyTorch's test_compatibility reproduces): still allowed weights-only."""
    from unittest.mock import patch

    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

    ckpt = str(tmp_path / "legacy")
    with patch("torch.distributed.checkpoint.metadata.TensorProperties", TensorProperties):
        dcp.save({"w": torch.arange(8.0), "step": 4}, storage_writer=dcp.FileSystemWriter(ckpt), no_dist=True)
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        assert b"torch.distributed._shard.sharded_tensor.metadata" in f.read()
    out = tmp_path / "out"
    out.mkdir()
    run(dcp_cases.load_cases, 2, [("legacy", ckpt, "simple", False)], str(out))
    for rank in (0, 1):
        text = (out / f"legacy.{rank}.txt").read_text()
        assert text == "OK " + repr({"w": list(map(float, range(8))), "step": 4}), text


def test_checkpoint_written_by_torch_2_9_loads_weights_only(tmp_path):
    """tests/fixtures/dcp_torch2.9: a stock DCP checkpoint (tensors, plain
    values, a BytesIO) written by torch 2.9.0 with dcp_cases.make_fixture.
    Its .metadata and BYTES items pass the weights-only reader."""
    with open(os.path.join(dcp_cases.FIXTURE_DIR, "TORCH_VERSION")) as f:
        assert f.read().startswith("2.9.")
    out = tmp_path / "out"
    out.mkdir()
    run(dcp_cases.load_cases, 2, [("torch29", dcp_cases.FIXTURE_DIR, "fixture", False)], str(out))
    want = {k: dcp_cases._plain(v) for k, v in dcp_cases.fixture_state().items()}
    for rank in (0, 1):
        assert (out / f"torch29.{rank}.txt").read_text() == "OK " + repr(want)


def test_the_writer_takes_file_system_writers_arguments_and_a_registered_transform(tmp_path):
    """StorageWriter replaces FileSystemWriter by name (DCP's own tests pass
    thread_count and friends), and a user-registered stream transform
    (torch's Rot13 test extension) round-trips through both readers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import SerializationFormat
    from torch.testing._internal.distributed.checkpoint_utils import Rot13Example, get_test_extension_registry

    from ckptio.distributed import StorageReader, StorageWriter

    state = {"w": torch.arange(64.0), "blob": b"SomeBlobForTesting", "n": 3}
    ckpt = str(tmp_path / "ckpt")
    writer = StorageWriter(ckpt, thread_count=2, sync_files=True, single_file_per_rank=True,
                           per_thread_copy_ahead=1 << 20, cache_staged_state_dict=False,
                           serialization_format=SerializationFormat.TORCH_SAVE, _extensions=[Rot13Example()])
    dcp.save(state, storage_writer=writer, no_dist=True)
    for reader in (StorageReader, dcp.FileSystemReader):
        target = {"w": torch.zeros(64), "blob": b"", "n": 0}
        dcp.load(target, storage_reader=reader(ckpt, _extension_registry=get_test_extension_registry()),
                 no_dist=True)
        assert torch.equal(target["w"], state["w"]) and target["blob"] == state["blob"] and target["n"] == 3
    with pytest.raises(ValueError, match="torch.save archives"):
        StorageWriter(ckpt, serialization_format=SerializationFormat.SAFETENSORS)
