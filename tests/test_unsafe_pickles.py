"""A checkpoint can never change how later checkpoints load.

Every global a reader of ours gives a pickle (load_into's storage-type
markers, rebuild functions and dtypes; DCP ``.metadata``'s classes, Enum
members and paths) is written into by pickles that call nothing: BUILD
(``__setstate__``, ``__dict__``, setattr, ``__defaults__``), SETITEM(S),
APPEND(S). Each must be refused with UnsafeCheckpointError naming the file,
and afterwards intact checkpoints must still load bit-exact in the same
process: before the fix, one such file made every later float32 checkpoint
load as int32 bits.
"""

import dataclasses
import enum
import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hostile_pickles import (
    archive_bytes_with_pickle,
    archive_with_pickle,
    global_op,
    hostile_pickles,
    hostile_pickles_on_made_objects,
    text,
)
from torch.distributed.checkpoint.api import CheckpointException

import ckptio
from ckptio import UnsafeCheckpointError
from ckptio.distributed import StorageReader, _metadata_allowlist

EXPECTED = torch.arange(8, dtype=torch.float32)

# What load_into's fast path and the DCP reader's item path give a pickle.
SKELETON_GLOBALS = sorted(
    {f"torch.{name}" for name, v in vars(torch).items() if isinstance(v, torch.dtype)}
    | {f"torch.{name}" for name in torch.storage._dtype_to_storage_type_map().values()}
    | {"torch.storage.UntypedStorage", "torch.UntypedStorage", "collections.OrderedDict",
       "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_parameter"}
)


def _cases_for(globals_):
    return {**hostile_pickles(globals_), **hostile_pickles_on_made_objects()}


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("intact") / "intact.pt")
    ckptio.save({"w": EXPECTED.clone(), "step": 7}, path)
    return path


def _intact_loads_exactly(path):
    target = {"w": torch.zeros(8)}
    ckptio.load_into(target, path)
    assert torch.equal(target["w"], EXPECTED) and target["w"].dtype == torch.float32
    loose = ckptio.load_into({}, path, strict=False)
    assert torch.equal(loose["w"], EXPECTED) and loose["w"].dtype == torch.float32
    assert torch.equal(ckptio.load(path)["w"], EXPECTED)
    assert torch.equal(torch.load(path, weights_only=True)["w"], EXPECTED)


def _refused(call, path):
    """None if call() raised UnsafeCheckpointError naming `path`, else what happened."""
    try:
        got = call()
    except BaseException as e:  # noqa: BLE001 - judged below (DCP raises CheckpointException, a BaseException)
        if isinstance(e, CheckpointException):  # DCP wraps each rank's error
            e = next(iter(e.failures.values()))[0]  # noqa: PLW2901
        if not isinstance(e, UnsafeCheckpointError):
            return f"raised {type(e).__name__}: {str(e)[:200]}"
        return None if path in str(e) else f"refused without naming the file: {e}"
    return f"accepted, returned {type(got).__name__}"


def test_load_and_load_into_refuse_every_write_into_a_shared_object(tmp_path, intact):
    assert len(SKELETON_GLOBALS) > 40  # every dtype and storage type, not a sample
    path = str(tmp_path / "hostile.pt")
    wrong = []
    for case, data_pkl in _cases_for(SKELETON_GLOBALS).items():
        archive_with_pickle(path, data_pkl)
        for reader, call in (("load_into strict", lambda: ckptio.load_into({"w": torch.zeros(8)}, path)),
                             ("load_into loose", lambda: ckptio.load_into({}, path, strict=False)),
                             ("load", lambda: ckptio.load(path))):
            problem = _refused(call, path)
            if problem:
                wrong.append(f"{reader}, {case}: {problem}")
        _intact_loads_exactly(intact)  # after every case: nothing it did outlived it
    assert not wrong, "\n".join(wrong[:30])


def test_a_refusal_names_the_file_and_what_was_refused(tmp_path):
    path = str(tmp_path / "hostile.pt")
    archive_with_pickle(path, hostile_pickles(["torch.FloatStorage"])["BUILD dict state on torch.FloatStorage"])
    with pytest.raises(UnsafeCheckpointError) as info:
        ckptio.load_into({}, path, strict=False)
    assert path in str(info.value) and "build" in str(info.value).lower()
    assert info.value.path == path and info.value.record == "data.pkl"
    assert isinstance(info.value, pickle.UnpicklingError)  # what torch.load(weights_only=True) raises


def test_the_fast_path_still_serves_what_torch_save_writes():
    """The opcode check accepts torch.save's own pickles (state dicts with
    _metadata, optimizers, Parameters): the fast path is not disabled."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    import io
    import zipfile

    from ckptio import _C

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "p": torch.nn.Parameter(torch.ones(2)),
                "steps": [1, 2], "nested": {"t": (torch.ones(1), 2.5, None, True, "x" * 300, 2**70)}}, buf)
    with zipfile.ZipFile(buf) as z:
        data_pkl = next(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    assert _C.check_pickle(data_pkl) == ("fast", "")
    hostile = hostile_pickles(["torch.FloatStorage"])
    verdict, reason = _C.check_pickle(hostile["BUILD dict state on torch.FloatStorage"])
    assert verdict == "unsafe" and "BUILD on a global" in reason
    assert _C.check_pickle(hostile["APPEND on torch.FloatStorage"])[0] == "unsafe"
    assert _C.check_pickle(b"\x80\x02]q\x00.")[0] == "fast"
    assert _C.check_pickle(b"\x80\x04\x95")[0] == "slow"  # protocol 4 framing: torch's unpickler judges it


# --------------------------------------------------------------------------
# DCP: item archives (the fast path with TensorSpecs) and .metadata
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def intact_dcp(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dcp") / "intact")
    dcp.save({"w": EXPECTED.clone()}, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    return path


def _dcp_loads_exactly(path):
    target = {"w": torch.zeros(8)}
    dcp.load(target, storage_reader=StorageReader(path), no_dist=True)
    assert torch.equal(target["w"], EXPECTED) and target["w"].dtype == torch.float32


def _with_item_pickle(intact_dir, path, data_pkl):
    """A copy of `intact_dir` whose item "w" is an archive with `data_pkl`."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(intact_dir, path)
    with open(os.path.join(path, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # noqa: S301 - our own intact checkpoint
    archive = archive_bytes_with_pickle(data_pkl)
    with open(os.path.join(path, "hostile.distcp"), "wb") as f:
        f.write(archive)
    for index, info in list(metadata.storage_data.items()):
        if index.fqn == "w":
            metadata.storage_data[index] = dataclasses.replace(info, relative_path="hostile.distcp", offset=0,
                                                               length=len(archive))
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


def test_dcp_reader_refuses_every_write_into_a_shared_object_in_an_item(tmp_path, intact_dcp):
    path = str(tmp_path / "hostile")
    wrong = []
    for case, data_pkl in _cases_for(SKELETON_GLOBALS).items():
        _with_item_pickle(intact_dcp, path, data_pkl)
        problem = _refused(lambda: dcp.load({"w": torch.zeros(8)}, storage_reader=StorageReader(path),
                                            no_dist=True), path)
        if problem:
            wrong.append(f"{case}: {problem}")
    _dcp_loads_exactly(intact_dcp)
    assert not wrong, "\n".join(wrong[:30])


def _metadata_globals():
    return sorted(_metadata_allowlist(()))


def _shared_state(objects):
    """What a hostile write could change on each allowlisted object."""
    state = {}
    for name, obj in objects.items():
        members = list(obj) if isinstance(obj, type) and issubclass(obj, enum.Enum) else []
        state[name] = (dict(getattr(obj, "__dict__", {})), [dict(vars(m)) for m in members],
                       getattr(obj, "__defaults__", None))
    return state


def _enum_member_writes():
    """BUILD on an Enum member the pickle looked up (REDUCE of its class): the
    member is shared by every user of the Enum."""
    cases = {}
    for name, obj in _metadata_allowlist(()).items():
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            value = next(iter(obj)).value
            if isinstance(value, int):
                member = global_op(name) + b"J" + value.to_bytes(4, "little", signed=True) + b"\x85R"
                cases[f"BUILD on a member of {name}"] = (b"\x80\x02" + member + b"}" + text("_value_")
                                                         + b"J\x05\x00\x00\x00sb.")
    assert cases  # _MEM_FORMAT_ENCODING is allowlisted
    return cases


def test_dcp_metadata_refuses_every_write_into_a_shared_object(tmp_path, intact_dcp):
    allowed = _metadata_allowlist(())
    before = _shared_state(allowed)
    path = str(tmp_path / "hostile")
    shutil.copytree(intact_dcp, path)
    cases = {**hostile_pickles(_metadata_globals()), **hostile_pickles_on_made_objects(), **_enum_member_writes()}
    wrong = []
    for case, data in cases.items():
        with open(os.path.join(path, ".metadata"), "wb") as f:
            f.write(data)
        problem = _refused(lambda: StorageReader(path).read_metadata(), path)
        if problem:
            wrong.append(f"{case}: {problem}")
    changed = [name for name, state in _shared_state(allowed).items() if state != before[name]]
    assert not changed, f"hostile .metadata changed {changed}"
    _dcp_loads_exactly(intact_dcp)
    assert not wrong, "\n".join(wrong[:30])
