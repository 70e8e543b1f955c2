"""A fixed corpus of damaged files: every reader ends in a ckptio error or
the exact tensors, never in IndexError, ValueError or another bare error
from torch's unpickler or the zip parser.

The corpus is derived from a checked-in checkpoint (fixtures/hostile/clean.pt)
by rules and a fixed seed, so every run tests the same files: truncation at
every structural boundary (and one byte either side), bit flips in every
region (each record's local header, payload and data descriptor, each
central directory entry, the ZIP64 end record and locator, the end record),
all 256 one-byte files and seeded random bytes. Open-ended search lives in
``make fuzz`` and tests/test_hostile.py's mutator.
"""

from __future__ import annotations

import random
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import ckptio

CLEAN = Path(__file__).parent / "fixtures" / "hostile" / "clean.pt"
SEED = 20261206


def _expected() -> dict:
    a = torch.arange(300, dtype=torch.int64)
    return {"a": a, "b": torch.linspace(0, 1, 35).view(7, 5), "c": [torch.ones(2), 3],
            "view": torch.arange(10.0)[2:8:2], "step": 7, "shares_a": a[10:20]}


def _exact(out) -> bool:
    want = _expected()
    if not isinstance(out, dict) or set(out) != set(want) or out["step"] != 7 or out["c"][1] != 3:
        return False
    return all(torch.equal(out[k], want[k]) and out[k].dtype == want[k].dtype
               for k in ("a", "b", "view", "shares_a")) and torch.equal(out["c"][0], want["c"][0])


def _regions(data: bytes) -> dict[str, tuple[int, int]]:
    """name -> [start, end) of every structural part of the archive."""
    regions = {}
    with zipfile.ZipFile(CLEAN) as z:
        infos = z.infolist()
        eocd = data.rindex(b"PK\x05\x06")
        cd_start = struct.unpack_from("<I", data, eocd + 16)[0]
        if cd_start == 0xFFFFFFFF:  # ZIP64: the real offset is in the ZIP64 end record
            z64 = data.rindex(b"PK\x06\x06")
            cd_start = struct.unpack_from("<Q", data, z64 + 48)[0]
    for info in infos:
        name = info.filename.split("/", 1)[1]
        start = info.header_offset
        name_len, extra_len = struct.unpack_from("<HH", data, start + 26)
        payload = start + 30 + name_len + extra_len
        regions[f"local header of {name}"] = (start, payload)
        regions[f"payload of {name}"] = (payload, payload + info.compress_size)
        if info.flag_bits & 0x08 and info.compress_size:
            end = payload + info.compress_size
            size = 24 if data[end:end + 4] == b"PK\x07\x08" and info.compress_size >= 0xFFFFFFFF else 16
            regions[f"data descriptor of {name}"] = (end, end + size)
    pos = cd_start
    for info in infos:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        end = pos + 46 + name_len + extra_len + comment_len
        regions[f"directory entry of {info.filename.split('/', 1)[1]}"] = (pos, end)
        pos = end
    if b"PK\x06\x06" in data[pos:]:
        z64 = data.index(b"PK\x06\x06", pos)
        regions["ZIP64 end record"] = (z64, z64 + 56)
        locator = data.index(b"PK\x06\x07", z64)
        regions["ZIP64 locator"] = (locator, locator + 20)
    regions["end record"] = (eocd, len(data))
    return regions


def _corpus() -> dict[str, bytes]:
    data = CLEAN.read_bytes()
    rng = random.Random(SEED)
    cases: dict[str, bytes] = {}
    regions = _regions(data)
    boundaries = sorted({b for r in regions.values() for b in r} | {0, len(data)})
    for cut in boundaries:
        for at in (cut - 1, cut, cut + 1):
            if 0 <= at < len(data):
                cases[f"truncated at byte {at}"] = data[:at]
    for region, (start, end) in regions.items():
        if end <= start:
            continue
        for _ in range(6):
            pos, bit = rng.randrange(start, end), rng.randrange(8)
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            cases[f"bit {bit} of byte {pos} flipped ({region})"] = bytes(flipped)
    for value in range(256):
        cases[f"one byte {value:#04x}"] = bytes([value])
    for i in range(48):
        cases[f"random bytes #{i}"] = bytes(rng.randrange(256) for _ in range(rng.choice([2, 30, 300, 5000])))
        # random bytes behind the magic numbers a reader looks at first
        cases[f"zip magic then random #{i}"] = b"PK\x03\x04" + bytes(rng.randrange(256) for _ in range(200))
        cases[f"pickle PROTO then random #{i}"] = b"\x80\x02" + bytes(rng.randrange(256) for _ in range(200))
    return cases


READERS = {
    "load": lambda p: ckptio.load(p),
    "load verify=False": lambda p: ckptio.load(p, verify=False),
    "load_into": lambda p: ckptio.load_into({"a": torch.zeros(300, dtype=torch.int64)}, p, strict=False),
    "load_into verify=False": lambda p: ckptio.load_into({"a": torch.zeros(300, dtype=torch.int64)}, p,
                                                         strict=False, verify=False),
    "verify": lambda p: ckptio.verify(p),
}


def test_the_corpus_covers_every_region():
    regions = _regions(CLEAN.read_bytes())
    assert sum(r.startswith("payload of data/") for r in regions) == 4
    assert {"end record", "ZIP64 end record", "ZIP64 locator", "local header of data.pkl",
            "directory entry of data.pkl", "data descriptor of data/0"} <= set(regions)
    assert len(_corpus()) > 600
    assert _exact(ckptio.load(CLEAN)) and _exact(torch.load(CLEAN, weights_only=True))


@pytest.mark.parametrize("reader", list(READERS))
def test_every_damaged_file_ends_in_a_ckptio_error_or_the_exact_tensors(tmp_path, reader):
    read = READERS[reader]
    path = tmp_path / "ckpt.pt"
    wrong = []
    for case, data in _corpus().items():
        path.write_bytes(data)
        try:
            out = read(path)
        except ckptio.CkptioError as e:
            if str(path) not in str(e):
                wrong.append(f"{case}: the error does not name the file: {e}")
            if isinstance(e, ckptio.UnsafeCheckpointError) and "random" in case:
                wrong.append(f"{case}: random bytes called unsafe rather than damaged: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - what must not escape
            wrong.append(f"{case}: {type(e).__name__}: {str(e)[:160]}")
            continue
        # Accepted: a flip in bytes no reader looks at (padding) or, unverified, payload bytes.
        if reader in ("load", "load_into") and not _exact(out):
            wrong.append(f"{case}: loaded without an error but the tensors differ")
    assert not wrong, f"{len(wrong)} of {len(_corpus())} files:\n" + "\n".join(wrong[:25])
