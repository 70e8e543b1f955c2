"""Hostile files: a hypothesis-driven mutator over ckptio.load(weights_only=True)
and ckptio.verify. Whatever the bytes, the answer is the original object or a
clear ckptio error: no crash, no hang, no read outside the file (the same tests
run under AddressSanitizer in `make test-sanitize`)."""

import pickle

import pytest
import torch

import ckptio

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

STATE = {"a": torch.arange(300, dtype=torch.int64), "b": torch.randn(7, 5), "c": [torch.ones(2), 3], "step": 7}
_CLEAN = {}


def _clean_bytes(tmp_path_factory) -> bytes:
    if "bytes" not in _CLEAN:
        path = tmp_path_factory.mktemp("clean") / "ckpt.pt"
        ckptio.save(STATE, path)
        _CLEAN["bytes"] = path.read_bytes()
    return _CLEAN["bytes"]


def _same(out) -> bool:
    return (out["step"] == 7 and torch.equal(out["a"], STATE["a"]) and torch.equal(out["b"], STATE["b"])
            and torch.equal(out["c"][0], STATE["c"][0]) and out["c"][1] == 3)


def _u32(value):
    return value.to_bytes(4, "little")


# Edits: flip a bit, overwrite a 4-byte field with a boundary value, or cut the file.
edit = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("u32"), st.integers(0, 1 << 20),
              st.sampled_from([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFF, 4096, 1 << 31])),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20), st.just(0)),
)


def _apply(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in edits:
        if not buf:
            break
        pos %= len(buf)
        if kind == "flip":
            buf[pos] ^= 1 << value
        elif kind == "u32":
            buf[pos : pos + 4] = _u32(value)[: len(buf) - pos]
        else:
            del buf[pos:]
    return bytes(buf)


# derandomize: the same 1500 cases every run, so make test cannot pass one run and fail the next.
@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(edit, min_size=1, max_size=4))
def test_mutated_checkpoints_load_correctly_or_fail_clearly(tmp_path_factory, edits):
    data = _apply(_clean_bytes(tmp_path_factory), edits)
    path = tmp_path_factory.mktemp("mut") / "ckpt.pt"
    path.write_bytes(data)
    try:
        ckptio.verify(path)
        verified = True
    except ckptio.CkptioError:
        verified = False
    try:
        out = ckptio.load(path, weights_only=True)
    except (ckptio.CkptioError, pickle.UnpicklingError):
        return  # a clear refusal
    # Accepted: the mutation hit bytes no record covers (padding, timestamps) and
    # the content is intact, which verify must agree with.
    assert _same(out), "load returned altered tensors without an error"
    assert verified


@pytest.mark.parametrize("data", [b"\x80", b"\x80\x02", b"\x80\x02]q\x00(", b"\x80\x02X\xff\xff\xff\x7f"])
def test_a_truncated_legacy_pickle_is_named_damaged(tmp_path, data):
    """What a random byte flip found once: torch's unpickler raised IndexError on a one-byte file."""
    path = tmp_path / "legacy.pt"
    path.write_bytes(data)
    with pytest.raises(ckptio.CorruptCheckpointError, match="not a readable checkpoint"):
        ckptio.load(path)


def test_declared_sizes_beyond_the_file_are_rejected_before_allocating(tmp_path):
    # A central directory claiming a 2 GiB record in a 40 KiB file.
    import resource

    path = tmp_path / "ckpt.pt"
    ckptio.save(STATE, path)
    data = bytearray(path.read_bytes())
    name = b"ckpt/data/0"
    pos = data.find(b"PK\x01\x02")
    while data[pos + 46 : pos + 46 + len(name)] != name:
        pos = data.find(b"PK\x01\x02", pos + 4)
    data[pos + 20 : pos + 28] = _u32(0x7FFFFFFF) * 2
    path.write_bytes(bytes(data))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ckptio.CorruptCheckpointError, match="data/0"):
        ckptio.load(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 << 10  # KiB: nothing near 2 GiB


def test_a_record_name_that_is_not_utf8_is_reported_not_crashed_on(tmp_path):
    """Found by the mutator above: 0xffffffff over a central-directory entry's
    local-header offset and the first byte of its name. The error naming that
    record then failed to decode the name (UnicodeDecodeError)."""
    path = tmp_path / "ckpt.pt"
    ckptio.save(STATE, path)
    data = bytearray(path.read_bytes())
    name_at = data.find(b"ckpt/", data.find(b"PK\x01\x02"))  # the first central-directory name
    data[name_at - 3 : name_at + 1] = b"\xff" * 4
    path.write_bytes(bytes(data))
    for check in (ckptio.verify, lambda p: ckptio.load(p, weights_only=True)):
        with pytest.raises(ckptio.CorruptCheckpointError) as e:
            check(path)
        assert str(path) in str(e.value)
