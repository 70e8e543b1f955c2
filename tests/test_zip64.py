"""Checkpoints past 4 GiB need ZIP64 records, sizes and offsets."""

import zipfile

import pytest
import torch
from torch.utils.serialization import config as torch_config

import ckptio

pytestmark = pytest.mark.slow


def test_checkpoint_over_4gib_round_trips(tmp_path):
    big = torch.empty((4 << 30) + 12345, dtype=torch.uint8)  # one record >= 0xFFFFFFFF bytes
    big[:: 1 << 20] = torch.arange(big[:: 1 << 20].numel(), dtype=torch.uint8)
    big[-100:] = 7
    state = {"head": torch.randn(1000), "big": big, "after": torch.arange(1000), "step": 5}
    path = tmp_path / "huge.pt"
    ckptio.save(state, path)
    del big

    with zipfile.ZipFile(path) as z:
        info = {i.filename.split("/", 1)[1]: i for i in z.infolist()}
        assert info["data/1"].file_size == (4 << 30) + 12345
        assert info["data/2"].header_offset > 0xFFFFFFFF  # ZIP64 offset after the big record
        assert z.testzip() is None  # every CRC, including the 4 GiB one, read back

    out = ckptio.load(path)  # CRC-verified
    assert torch.equal(out["big"], state["big"]) and torch.equal(out["after"], state["after"])
    del out
    mapped = torch.load(path, weights_only=True, mmap=True)
    assert torch.equal(mapped["big"][-200:], state["big"][-200:])
    assert torch.equal(mapped["after"], state["after"])
    old = torch_config.load.calculate_storage_offsets
    torch_config.load.calculate_storage_offsets = True
    try:
        mapped = torch.load(path, weights_only=True, mmap=True)
        assert torch.equal(mapped["after"], state["after"]) and torch.equal(mapped["head"], state["head"])
    finally:
        torch_config.load.calculate_storage_offsets = old
