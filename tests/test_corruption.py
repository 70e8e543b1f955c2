"""Damaged or foreign files raise clear ckptio errors; nothing crashes."""

import pickle
import zipfile

import pytest
import torch

import ckptio


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt.pt"
    ckptio.save({"a": torch.randn(1000), "b": torch.arange(5000), "step": 3}, path)
    return path


def _payload_offset(path, record):
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{path.stem}/{record}")
    raw = path.read_bytes()
    n = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    m = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    return info.header_offset + 30 + n + m


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("record", ["data/0", "data/1", "data.pkl"])
def test_flipped_payload_byte_is_named(ckpt, record):
    _flip(ckpt, _payload_offset(ckpt, record) + 100)
    with pytest.raises(ckptio.CorruptCheckpointError) as info:
        ckptio.load(ckpt)
    assert info.value.record == record
    assert record in str(info.value) and str(ckpt) in str(info.value)
    with pytest.raises(ckptio.CorruptCheckpointError, match=record):
        ckptio.verify(ckpt)


def test_flip_goes_unnoticed_by_torch_but_not_ckptio(ckpt):
    _flip(ckpt, _payload_offset(ckpt, "data/0") + 4)
    torch.load(ckpt, weights_only=True)  # torch never checks CRCs
    with pytest.raises(ckptio.CorruptCheckpointError):
        ckptio.load(ckpt)


def test_verify_false_skips_the_check(ckpt):
    _flip(ckpt, _payload_offset(ckpt, "data/1") + 8)
    out = ckptio.load(ckpt, verify=False)
    assert not torch.equal(out["b"], torch.arange(5000))


@pytest.mark.parametrize("keep", [0, 10, 100, 4096, -22, -100, -1])
def test_truncated_files(ckpt, keep):
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ckptio.CorruptCheckpointError):
        ckptio.load(ckpt)
    with pytest.raises(ckptio.CorruptCheckpointError):
        ckptio.verify(ckpt)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ckptio.CorruptCheckpointError, match="too small|not a"):
        ckptio.load(tmp_path / "empty.pt")


@pytest.mark.parametrize("content", [b"hello world" * 100, bytes(range(256)) * 64, b"PK\x03\x04" + b"\0" * 200])
def test_garbage_files(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(ckptio.CorruptCheckpointError):
        ckptio.load(path)
    with pytest.raises(ckptio.CorruptCheckpointError):
        ckptio.verify(path)


def test_missing_file(tmp_path):
    with pytest.raises(ckptio.CheckpointNotFoundError) as info:
        ckptio.load(tmp_path / "nope.pt")
    assert isinstance(info.value, FileNotFoundError)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ckptio.CheckpointIOError):
        ckptio.load(tmp_path)


def test_declared_size_beyond_file_is_rejected(ckpt):
    # Point data/1's central-directory size far past the end of the file.
    data = bytearray(ckpt.read_bytes())
    name = f"{ckpt.stem}/data/1".encode()
    pos = data.find(b"PK\x01\x02")
    while data[pos + 46 : pos + 46 + len(name)] != name:
        pos = data.find(b"PK\x01\x02", pos + 4)
    data[pos + 20 : pos + 28] = (0x7FFFFFF0).to_bytes(4, "little") * 2
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ckptio.CorruptCheckpointError, match="data/1"):
        ckptio.load(ckpt)


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > /dev/null",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckptio.load(path)
    with pytest.raises(pickle.UnpicklingError):
        ckptio.load(path, weights_only=None)  # torch's default: weights only
