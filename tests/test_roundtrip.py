"""Round trips between ckptio and torch in every loading mode torch offers."""

import pickle
import zipfile

import pytest
import torch
from torch.utils.serialization import config as torch_config

import ckptio
from conftest import assert_same


@pytest.fixture
def torch_config_set():
    """Set torch.utils.serialization.config values for one test (monkeypatch
    cannot restore attributes on torch's config proxies)."""
    changed = []

    def set_(section, name, value):
        changed.append((section, name, getattr(section, name)))
        setattr(section, name, value)

    yield set_
    for section, name, old in reversed(changed):
        setattr(section, name, old)


@pytest.fixture
def saved(tmp_path, everything_state):
    path = tmp_path / "everything.pt"
    ckptio.save(everything_state, path)
    return path


def test_plain_torch_load_weights_only(saved, everything_state):
    assert_same(torch.load(saved, weights_only=True), everything_state)


def test_plain_torch_load_mmap(saved, everything_state):
    assert_same(torch.load(saved, weights_only=True, mmap=True), everything_state)


def test_plain_torch_load_calculated_offsets(saved, everything_state, torch_config_set):
    torch_config_set(torch_config.load, "calculate_storage_offsets", True)
    assert_same(torch.load(saved, weights_only=True, mmap=True), everything_state)


def test_offsets_match_torch_debug_check(saved, everything_state, monkeypatch, torch_config_set):
    # TORCH_SERIALIZATION_DEBUG makes torch cross-check every computed offset
    # against the directory: our layout must be miniz's exactly.
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    torch_config_set(torch_config.load, "calculate_storage_offsets", True)
    assert_same(torch.load(saved, weights_only=True, mmap=True), everything_state)
    assert_same(torch.load(saved, weights_only=True), everything_state)


def test_plain_torch_load_meta(saved, everything_state):
    out = torch.load(saved, weights_only=True, map_location="meta")
    assert out["float_torch.float32"].device.type == "meta"
    assert_same(out, everything_state)  # shapes, dtypes, strides


def test_views_still_share_storage(saved):
    out = ckptio.load(saved)
    assert out["view_a"].untyped_storage().data_ptr() == out["view_b"].untyped_storage().data_ptr()
    assert out["view_a"].storage_offset() == 10
    assert out["view_a"].untyped_storage().nbytes() == 4000  # the whole storage, as torch.save


def test_ckptio_load_matches_torch_load(saved, everything_state):
    ours = ckptio.load(saved)
    assert_same(ours, everything_state)
    assert_same(ours, torch.load(saved, weights_only=True))


@pytest.mark.parametrize("mode", [dict(mmap=True), dict(map_location="meta"), dict(verify=False)])
def test_ckptio_load_modes(saved, everything_state, mode):
    assert_same(ckptio.load(saved, **mode), everything_state)


def test_torch_save_files_load_with_ckptio(tmp_path, everything_state):
    path = tmp_path / "by_torch.pt"
    torch.save(everything_state, path)  # 64-byte alignment, torch's own writer
    assert_same(ckptio.load(path), everything_state)
    ckptio.verify(path)


def test_torch_save_file_object_archive_loads(tmp_path, everything_state):
    path = tmp_path / "stream.pt"
    with open(path, "wb") as f:  # a file object: prefix "archive/"
        torch.save(everything_state, f)
    assert_same(ckptio.load(path), everything_state)


def test_legacy_format_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    state = {"w": torch.randn(3, 3)}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert_same(ckptio.load(path), state)


def test_map_location_cpu_and_callable(saved, everything_state):
    assert_same(ckptio.load(saved, map_location="cpu"), everything_state)
    assert_same(ckptio.load(saved, map_location=lambda storage, loc: storage), everything_state)


def test_weights_only_false_loads_arbitrary_objects(tmp_path):
    path = tmp_path / "obj.pt"
    state = {"fn": len, "set": {1, 2}, "t": torch.ones(2)}
    ckptio.save(state, path)
    out = ckptio.load(path, weights_only=False)
    assert out["fn"] is len and out["set"] == {1, 2}
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckptio.load(path, weights_only=True)


def test_loaded_tensors_behave_like_torch_loaded(saved):
    out = ckptio.load(saved)
    t = out["float_torch.float32"]
    t.add_(1)  # writable
    assert t.share_memory_().is_shared()
    assert out["param"].grad is None and isinstance(out["param"], torch.nn.Parameter)


def test_zipfile_accepts_every_crc(saved):
    assert zipfile.ZipFile(saved).testzip() is None


def test_records_are_page_aligned(saved):
    with zipfile.ZipFile(saved) as z:
        for info in z.infolist():
            with open(saved, "rb") as f:
                f.seek(info.header_offset + 26)
                n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
            assert (info.header_offset + 30 + n + m) % 4096 == 0, info.filename
        assert z.read("everything/.storage_alignment") == b"4096"


def test_prefix_is_file_stem(tmp_path):
    ckptio.save({"a": torch.ones(1)}, tmp_path / "step_000100.ckpt")
    names = zipfile.ZipFile(tmp_path / "step_000100.ckpt").namelist()
    assert all(n.startswith("step_000100/") for n in names), names


def _saved_by_both(tmp_path, state, torch_config_set):
    """`state` saved by ckptio.save and by torch.save (4096-byte alignment):
    our file's path, then both files' bytes with the serialization id masked."""
    ours, theirs = tmp_path / "a" / "ckpt.pt", tmp_path / "b" / "ckpt.pt"
    ours.parent.mkdir()
    theirs.parent.mkdir()
    ckptio.save(state, ours)
    torch_config_set(torch_config.save, "storage_alignment", 4096)
    torch.save(state, theirs)
    return ours, _mask_serialization_id(ours), _mask_serialization_id(theirs)


def test_same_bytes_as_torch_save_with_4096_alignment(tmp_path, everything_state, torch_config_set):
    _, a, b = _saved_by_both(tmp_path, everything_state, torch_config_set)
    assert len(a) == len(b)
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    assert diff == [], f"{len(diff)} bytes differ, first at {diff[:5]}"


class _Subclass(torch.Tensor):
    pass


def _special_tensors() -> dict:
    """Tensors the fast pickling path must hand to torch's own reduction, or
    reduce exactly as torch does: views with conj/neg bits, Python attributes,
    backward hooks, subclasses, v3 dtypes, shared storages, requires_grad."""
    g = torch.Generator().manual_seed(3)
    with_attr = torch.randn(4, generator=g)
    with_attr.note = "kept by torch's own reduction"
    hooked = torch.randn(3, generator=g, requires_grad=True)
    hooked.register_hook(lambda grad: grad)
    base = torch.arange(100, dtype=torch.float32)
    return {
        "conj": torch.randn(5, dtype=torch.complex64, generator=g).conj(),
        "neg": torch.randn(5, dtype=torch.complex64, generator=g).conj().imag,
        "with_attr": with_attr,
        "hooked": hooked,
        "subclass": torch.randn(6, generator=g).as_subclass(_Subclass),
        "uint16": torch.arange(9).to(torch.uint16),
        "requires_grad": torch.randn(2, 2, generator=g, requires_grad=True).detach().requires_grad_(),
        "shared": [base[:10], base[50:].view(5, 10), base],
        "int_and_float_views": {"a": base[:4], "b": base[4:8]},
        "channels_last": torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns that backward hooks are not saved
def test_fast_pickling_path_writes_torch_saves_bytes(tmp_path, torch_config_set):
    state = _special_tensors()
    ours, a, b = _saved_by_both(tmp_path, state, torch_config_set)
    assert a == b
    loaded = ckptio.load(ours, weights_only=False)
    assert loaded["with_attr"].note == state["with_attr"].note
    assert type(loaded["subclass"]) is _Subclass
    assert loaded["conj"].is_conj() and torch.equal(loaded["conj"], state["conj"])
    assert loaded["shared"][2].untyped_storage().data_ptr() == loaded["shared"][0].untyped_storage().data_ptr()


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns that backward hooks are not saved
def test_many_tensors_of_both_paths_write_torch_saves_bytes(tmp_path, torch_config_set):
    # Past 256 memo entries (4-byte memo indices), plain tensors (C reducer)
    # between ones torch reduces itself, storages shared across both, and
    # one-character strings equal to storage keys (CPython shares those
    # objects, so the pickler's memo must meet the same ones either way).
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4000, generator=g)
    special = _special_tensors()
    state = {str(i % 10): [] for i in range(10)}
    for i in range(600):
        kind = i % 6
        t = (base[i : i + 5] if kind == 0 else special["with_attr"] if kind == 1 else
             torch.randn(3, 2, generator=g).t() if kind == 2 else torch.nn.Parameter(torch.randn(2, generator=g))
             if kind == 3 else torch.arange(i, dtype=torch.int16) if kind == 4 else special["conj"])
        state[str(i % 10)].append({"t": t, "k": str(i % 10), "i": i})
    state["base"] = base
    _, a, b = _saved_by_both(tmp_path, state, torch_config_set)
    assert a == b


def test_a_tagger_registered_ahead_of_torchs_cpu_tagger_is_honoured(tmp_path, torch_config_set, monkeypatch):
    # The fast path answers "cpu" for CPU storages without asking every
    # tagger only while nobody else's comes first: this one does.
    import torch.serialization as ts

    tagged = torch.ones(3)

    def tag_one(storage):
        return "cpu" if storage.data_ptr() != tagged.data_ptr() else "cpu:tagged"

    monkeypatch.setattr(ts, "_package_registry", [(0, tag_one, lambda s, loc: s)] + list(ts._package_registry))
    _, a, b = _saved_by_both(tmp_path, {"tagged": tagged, "plain": torch.zeros(2)}, torch_config_set)
    assert a == b
    assert b"cpu:tagged" in a


def test_one_storage_viewed_as_two_dtypes_is_refused_like_torch_save(tmp_path):
    base = torch.zeros(8)
    with pytest.raises(RuntimeError, match="view the same data as different types"):
        ckptio.save({"f": base, "i": base.view(torch.int32)}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def _mask_serialization_id(path) -> bytes:
    """The file's bytes with the serialization id (random by design) and its
    CRC in the descriptor and the central directory zeroed."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{path.stem}/.data/serialization_id")
    n, m = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"), int.from_bytes(
        data[info.header_offset + 28 : info.header_offset + 30], "little"
    )
    start = info.header_offset + 30 + n + m
    data[start : start + 40] = b"\0" * 40
    data[start + 44 : start + 48] = b"\0" * 4  # descriptor CRC
    name = info.filename.encode()
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        if data[pos + 46 : pos + 46 + len(name)] == name:
            data[pos + 16 : pos + 20] = b"\0" * 4
            break
        pos = data.find(b"PK\x01\x02", pos + 4)
    return bytes(data)
