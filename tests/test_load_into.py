"""ckptio.load_into: checkpoints read straight into tensors that already exist."""

from collections import OrderedDict

import pytest
import torch

import ckptio
from conftest import assert_same
from test_corruption import _flip, _payload_offset
from test_roundtrip import saved  # noqa: F401 - the everything_state checkpoint fixture


def _bytes_of(t: torch.Tensor) -> bytes:
    """A tensor's bytes in element order, whatever its dtype, shape or strides."""
    return bytes(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()) if t.numel() else b""


def _tensors(obj, key=()):
    """(key path, tensor) of every tensor reachable through dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield key, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, key + (k,))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, key + (i,))


def _scribble(obj) -> None:
    """Overwrite every tensor's storage with a pattern no checkpoint holds."""
    seen = set()
    for _, t in _tensors(obj):
        s = t.untyped_storage()
        if s.data_ptr() not in seen and s.nbytes():
            seen.add(s.data_ptr())
            torch.empty(0, dtype=torch.uint8).set_(s).fill_(0xA5)


def _snapshot(obj) -> dict:
    return {k: _bytes_of(t) for k, t in _tensors(obj)}


def test_same_structure_target_gets_every_tensor_in_place(saved, everything_state):
    # A target built like the checkpoint (views sharing one storage, strides,
    # Parameters, empty and 0-dim tensors), every byte scribbled over.
    target = torch.load(saved, weights_only=True)
    _scribble(target)
    addresses = {k: t.data_ptr() for k, t in _tensors(target)}
    out = ckptio.load_into(target, saved)
    assert_same(out, everything_state)
    for key, t in _tensors(out):
        assert t.data_ptr() == addresses[key], key
    assert out["view_a"].untyped_storage().data_ptr() == out["view_b"].untyped_storage().data_ptr()
    assert out["param"] is target["param"] and isinstance(out["param"], torch.nn.Parameter)
    assert out["step"] == 1234 and out["name"] == "model-v1"


def test_independent_target_tensors_receive_views_and_strided_tensors(saved, everything_state):
    # A state_dict-like target: one fresh tensor per key, no shared storage.
    target = torch.load(saved, weights_only=True)
    target = _map_tensors(target, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype))
    addresses = {k: t.data_ptr() for k, t in _tensors(target)}
    out = ckptio.load_into(target, saved)
    assert {k: t.data_ptr() for k, t in _tensors(out)} == addresses
    expected = dict(_tensors(everything_state))
    for key, t in _tensors(out):  # the target's own (plain) tensors, holding the checkpoint's values
        assert (t.dtype, t.shape, t.stride()) == (expected[key].dtype, expected[key].shape, expected[key].stride())
        assert _bytes_of(t) == _bytes_of(expected[key]), key


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    return obj


def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.BatchNorm1d(200), torch.nn.Linear(200, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(16, 300)).sum().backward()
    opt.step()
    return model, opt


def test_resume_reads_into_the_live_model_and_optimizer(tmp_path):
    model, opt = _model_and_optimizer(0)
    path = tmp_path / "resume.pt"
    ckptio.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 7}, path)

    model2, opt2 = _model_and_optimizer(1)
    weight = model2[0].weight
    address = weight.data_ptr()
    out = ckptio.load_into({"model": model2.state_dict(), "optimizer": opt2.state_dict()}, path)

    assert out["epoch"] == 7
    assert model2[0].weight is weight and weight.data_ptr() == address
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt2.state[p2][name], opt.state[p][name])
    # The returned optimizer state is the optimizer's own memory: load_state_dict keeps it.
    assert out["optimizer"]["state"][0]["exp_avg"].data_ptr() == opt2.state[model2[0].weight]["exp_avg"].data_ptr()
    opt2.load_state_dict(out["optimizer"])
    assert opt2.param_groups[0]["lr"] == 1e-3


def test_strict_mismatch_names_every_key_and_writes_nothing(tmp_path):
    path = tmp_path / "c.pt"
    ckptio.save({"model": {"w": torch.randn(4, 4), "b": torch.randn(4), "gone": torch.ones(2)}, "step": 1}, path)
    target = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(4, dtype=torch.float64), "new": torch.zeros(3)}}
    before = _snapshot(target)
    with pytest.raises(ckptio.StateMismatchError) as info:
        ckptio.load_into(target, path)
    e = info.value
    assert e.missing == ["model/new"] and e.unexpected == ["model/gone"]
    assert set(e.mismatched) == {"model/w", "model/b"}
    for key in ("model/new", "model/gone", "model/w", "model/b", "(4, 4) torch.float32", "(4, 3)"):
        assert key in str(e)
    assert isinstance(e, RuntimeError) and isinstance(e, ckptio.CkptioError)
    assert _snapshot(target) == before


def test_non_strict_allocates_what_has_no_place(tmp_path):
    path = tmp_path / "c.pt"
    state = {"model": {"w": torch.randn(4, 4), "b": torch.randn(4), "gone": torch.ones(2)}}
    ckptio.save(state, path)
    target = {"model": {"w": torch.zeros(4, 4), "b": torch.zeros(5), "new": torch.zeros(3)}}
    b_before, new_before = target["model"]["b"].clone(), target["model"]["new"].clone()
    out = ckptio.load_into(target, path, strict=False)
    assert out["model"]["w"] is target["model"]["w"] and torch.equal(target["model"]["w"], state["model"]["w"])
    assert torch.equal(out["model"]["b"], state["model"]["b"]) and out["model"]["b"] is not target["model"]["b"]
    assert torch.equal(out["model"]["gone"], state["model"]["gone"])
    assert torch.equal(target["model"]["b"], b_before) and torch.equal(target["model"]["new"], new_before)
    assert "new" not in out["model"]


def test_tied_target_tensors_get_the_checkpoint_bytes_in_order(tmp_path):
    # Two checkpoint tensors, one storage in the target (tied weights): both
    # land, deterministically (the later one wins, as load_state_dict's copies).
    path = tmp_path / "c.pt"
    ckptio.save({"a": torch.full((1 << 20,), 1.0), "b": torch.full((1 << 20,), 2.0)}, path)
    shared = torch.zeros(1 << 20)
    out = ckptio.load_into({"a": shared, "b": shared}, path)
    assert out["a"] is shared and out["b"] is shared
    assert torch.equal(shared, torch.full((1 << 20,), 2.0))


@pytest.mark.parametrize("zero_copy", ["0", "1"])
def test_page_aligned_targets_both_read_paths(tmp_path, monkeypatch, fresh_engine, zero_copy):
    # Tensors ckptio.load returned sit on page-aligned buffers: with
    # CKPTIO_READ_ZERO_COPY=1 whole pages go to them with O_DIRECT.
    monkeypatch.setenv("CKPTIO_READ_ZERO_COPY", zero_copy)
    state = {"big": torch.randn(3 << 20), "odd": torch.randn(1_000_003), "small": torch.arange(10)}
    path = tmp_path / "c.pt"
    ckptio.save(state, path)
    target = ckptio.load(path)
    _scribble(target)
    out = ckptio.load_into(target, path)
    assert_same(out, state)
    assert all(out[k] is target[k] for k in state)


def _large_and_small(tmp_path):
    path = tmp_path / "c.pt"
    state = {"large": torch.randn(4 << 20), "small": torch.randn(1000), "other": torch.randn(3 << 20)}
    ckptio.save(state, path)
    return path, state


def test_damaged_large_record_names_it_and_what_was_written(tmp_path):
    path, state = _large_and_small(tmp_path)
    _flip(path, _payload_offset(path, "data/0") + (5 << 20))  # inside "large"
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    before = _snapshot(target)
    with pytest.raises(ckptio.CorruptCheckpointError) as info:
        ckptio.load_into(target, path)
    e = info.value
    assert e.record == "data/0" and "data/0" in str(e) and str(path) in str(e)
    assert "large" in e.written_keys
    for key, t in _tensors(target):
        if "/".join(map(str, key)) not in e.written_keys:
            assert _bytes_of(t) == before[key], key


def test_damaged_small_record_never_reaches_the_target(tmp_path):
    path, state = _large_and_small(tmp_path)
    _flip(path, _payload_offset(path, "data/1") + 10)  # "small"
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    with pytest.raises(ckptio.CorruptCheckpointError) as info:
        ckptio.load_into(target, path)
    assert info.value.record == "data/1"
    assert "small" not in info.value.written_keys
    assert torch.equal(target["small"], torch.zeros(1000))


def test_damaged_pickle_writes_nothing(tmp_path):
    path, state = _large_and_small(tmp_path)
    _flip(path, _payload_offset(path, "data.pkl") + 20)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    with pytest.raises(ckptio.CorruptCheckpointError, match="data.pkl"):
        ckptio.load_into(target, path)
    assert all(not t.any() for t in target.values())


def test_verify_false_reads_without_checking(tmp_path):
    path, state = _large_and_small(tmp_path)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    assert_same(ckptio.load_into(target, path, verify=False), state)


def test_torch_save_files_and_legacy_files(tmp_path, everything_state):
    modern, legacy = tmp_path / "t.pt", tmp_path / "legacy.pt"
    torch.save(everything_state, modern)
    # The pre-1.6 format cannot hold float8 or uint16+ (torch.save refuses them there).
    old_state = {"w": torch.randn(5, 3), "view": torch.arange(10)[2:], "nested": [torch.ones(2)], "step": 4}
    torch.save(old_state, legacy, _use_new_zipfile_serialization=False)
    for path, state in ((modern, everything_state), (legacy, old_state)):
        target = torch.load(path, weights_only=True)
        _scribble(target)
        assert_same(ckptio.load_into(target, path), state)


def test_missing_file_and_unsafe_pickle(tmp_path):
    with pytest.raises(ckptio.CheckpointNotFoundError):
        ckptio.load_into({}, tmp_path / "nope.pt")
    path = tmp_path / "obj.pt"
    torch.save({"w": torch.ones(2), "obj": OrderedDict, "fn": print}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        ckptio.load_into({"w": torch.zeros(2)}, path)


def test_manager_load_latest_into(tmp_path):
    model, opt = _model_and_optimizer(0)
    with ckptio.CheckpointManager(tmp_path, keep_last=2) as mgr:
        mgr.save(1, {"model": model.state_dict(), "optimizer": opt.state_dict()})
        at_step_1 = model[0].weight.detach().clone()
        model[0].weight.data.add_(1)
        mgr.save(2, {"model": model.state_dict(), "optimizer": opt.state_dict()})
        mgr.wait()
        model2, opt2 = _model_and_optimizer(1)
        address = model2[0].weight.data_ptr()
        mgr.load_latest(into={"model": model2.state_dict(), "optimizer": opt2.state_dict()})
        assert model2[0].weight.data_ptr() == address
        assert torch.equal(model2[0].weight, model[0].weight)
        # The newest file damaged: the older one is read into the same tensors.
        newest = mgr.latest()
        _flip_payload_middle(newest)
        with pytest.warns(UserWarning, match="damaged"):
            mgr.load_latest(into={"model": model2.state_dict(), "optimizer": opt2.state_dict()})
        assert torch.equal(model2[0].weight, at_step_1)


def _flip_payload_middle(path):
    from pathlib import Path

    path = Path(path)
    _flip(path, _payload_offset(path, "data/0") + 1000)


def test_fast_skeleton_agrees_with_torchs_unpickler(saved):
    # Planning reads the pickle with CPython's C unpickler and a small
    # allowlist when it can; torch's own unpickler must see the same tensors.
    from ckptio import archive
    from ckptio.api import unpickle_archive as _unpickle
    from ckptio.skeleton import _FastSkeleton, _SkeletonArchive, unpickle_skeleton

    arc = archive.open_archive(str(saved))
    small = archive.read_small_records(str(saved), {None: arc}, verify=True)[None]
    fast, fast_records = unpickle_skeleton(arc, small, True, str(saved), _unpickle)
    assert _FastSkeleton(small["data.pkl"]).load() is not None  # the fast path took it (float8 and uint16 too)
    general_archive = _SkeletonArchive(arc, small)
    general = _unpickle(general_archive, lambda s, loc: s, True, str(saved))

    def layout(graph, records):
        return {k: (records[t.untyped_storage()._cdata], t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
                    type(t)) for k, t in _tensors(graph)}

    assert layout(fast, fast_records) == layout(general, general_archive.record_of)
    assert fast["step"] == general["step"] == 1234


def test_fast_skeleton_leaves_anything_else_to_torch(tmp_path):
    from ckptio.skeleton import _NOT_FAST, _FastSkeleton

    import pickle

    assert _FastSkeleton(pickle.dumps({"f": print}, protocol=2)).load() is _NOT_FAST
    assert _FastSkeleton(pickle.dumps(OrderedDict(a=1), protocol=2)).load() == OrderedDict(a=1)
    # A storage class is a marker here: calling it (REDUCE) is refused, not run.
    evil = b"\x80\x02ctorch\nFloatStorage\nK\x10\x85R."
    assert _FastSkeleton(evil).load() is _NOT_FAST


def _as_big_endian(path, out):
    """A copy of the torch.save archive at `path` whose payloads are big-endian
    (its byteorder record says so), as a big-endian machine writes it."""
    import zipfile

    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                # every tensor here is float32: reverse each 4-byte element
                data = bytes(torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, 4).flip(1)
                             .reshape(-1).numpy())
            dst.writestr(info, data)


def test_big_endian_checkpoints_are_swapped_not_placed(tmp_path):
    # torch swaps a non-native payload as its unpickler meets it: load_into
    # must neither place such records nor take the fast rebuild (which does
    # not swap), and the target must end up with the right values.
    state = {"w": torch.randn(1000), "b": torch.randn(7, 3)}
    native, big = tmp_path / "native.pt", tmp_path / "big.pt"
    torch.save(state, native)
    _as_big_endian(native, big)
    assert_same(torch.load(big, weights_only=True), state)  # what torch makes of it
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    out = ckptio.load_into(target, big)
    assert_same(out, state)
    assert all(out[k] is target[k] for k in state)
