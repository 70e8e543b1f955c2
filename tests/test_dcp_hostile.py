"""ckptio's DCP reader is weights-only: a checkpoint directory whose
``.metadata`` or BYTES items pickle a call to ``os.system`` is refused with
UnsafeCheckpointError, and the command never runs (DCP's stock reader runs
it). Real gloo ranks in spawned processes, real files."""

import os
import pathlib
import pickle
import shutil
import sys

import dcp_cases
import pytest
import torch
import torch.distributed.checkpoint as dcp
from dcp_cases import run

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

SYSTEM = f"{os.system.__module__}.system"  # how pickle names os.system ("posix.system" here)


class RunsCommand:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _save_no_dist(path, state, writer="ckptio"):
    from ckptio.distributed import StorageWriter

    w = StorageWriter(path) if writer == "ckptio" else dcp.FileSystemWriter(path)
    dcp.save(state, storage_writer=w, no_dist=True)


def _hostile_metadata(tmp_path):
    ckpt = tmp_path / "hostile_metadata"
    _save_no_dist(str(ckpt), {"w": torch.arange(8.0), "step": 1})
    marker = tmp_path / "metadata_ran"
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(RunsCommand(marker), f)
    return str(ckpt), marker


def _hostile_bytes(tmp_path):
    marker = tmp_path / "bytes_ran"
    ckpt = tmp_path / "hostile_bytes"
    _save_no_dist(str(ckpt), {"w": torch.arange(8.0), "evil": RunsCommand(marker)}, writer="stock")
    return str(ckpt), marker


def test_stock_reader_runs_the_hostile_payloads(tmp_path):
    """The control: the payloads are live (DCP's FileSystemReader runs them)."""
    for make, template in ((_hostile_metadata, {"w": torch.zeros(8)}), (_hostile_bytes, {"w": torch.zeros(8), "evil": 0})):
        ckpt, marker = make(tmp_path)
        try:
            dcp.load(template, storage_reader=dcp.FileSystemReader(ckpt), no_dist=True)
        except BaseException:  # noqa: BLE001, S110 - the hostile .metadata is no Metadata; the command ran first
            pass
        assert marker.exists(), ckpt


def test_hostile_metadata_is_refused_in_process(tmp_path):
    from ckptio.distributed import StorageReader, UnsafeCheckpointError

    ckpt, marker = _hostile_metadata(tmp_path)
    with pytest.raises(UnsafeCheckpointError) as info:
        StorageReader(ckpt).read_metadata()
    assert info.value.refused == (SYSTEM,)
    assert isinstance(info.value, pickle.UnpicklingError)  # what torch's weights-only refusals raise
    assert os.path.join(ckpt, ".metadata") in str(info.value) and SYSTEM in str(info.value)
    assert not marker.exists()


def test_hostile_checkpoints_are_refused_by_every_rank(tmp_path):
    meta_ckpt, meta_marker = _hostile_metadata(tmp_path)
    bytes_ckpt, bytes_marker = _hostile_bytes(tmp_path)

    # A BYTES item holding a user class: refused unless the caller trusts it.
    note_ckpt = str(tmp_path / "note")
    _save_no_dist(note_ckpt, {"w": torch.arange(8.0), "note": dcp_cases.Note("hello")}, writer="stock")

    # A .metadata pointing a read outside the checkpoint directory.
    escape = tmp_path / "escape"
    _save_no_dist(str(escape), {"w": torch.arange(8.0), "step": 1})
    shutil.copytree(escape, tmp_path / "elsewhere")
    with open(escape / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    for info in metadata.storage_data.values():
        info.relative_path = "../elsewhere/" + info.relative_path
    with open(escape / ".metadata", "wb") as f:
        pickle.dump(metadata, f)

    out = tmp_path / "out"
    out.mkdir()
    cases = [("metadata", meta_ckpt, "simple", False), ("bytes", bytes_ckpt, "evil", False),
             ("note_untrusted", note_ckpt, "note", False), ("note_trusted", note_ckpt, "note", True),
             ("escape", str(escape), "simple", False)]
    run(dcp_cases.load_cases, 2, cases, str(out))

    assert not meta_marker.exists() and not bytes_marker.exists()
    for rank in (0, 1):
        # DCP turns a failed metadata read into its own error, carrying ours as text.
        text = (out / f"metadata.{rank}.txt").read_text()
        assert text.startswith("ERROR") and os.path.join(meta_ckpt, ".metadata") in text, text
        assert f"refused to unpickle global '{SYSTEM}'" in text, text

        text = (out / f"bytes.{rank}.txt").read_text()
        assert text.startswith("ERROR") and "UnsafeCheckpointError" in text, text
        assert f"'{SYSTEM}'" in text and "item 'evil'" in text and "__0_0.distcp" in text, text

        text = (out / f"note_untrusted.{rank}.txt").read_text()
        assert "UnsafeCheckpointError" in text and "'dcp_cases.Note'" in text and "safe_globals" in text, text
        text = (out / f"note_trusted.{rank}.txt").read_text()
        assert text.startswith("OK") and "'note': 'hello'" in text and "'w': [0.0, 1.0" in text, text

        text = (out / f"escape.{rank}.txt").read_text()
        assert "CorruptCheckpointError" in text and "outside the checkpoint directory" in text, text


@pytest.mark.parametrize("module", ["pathlib", "pathlib._local"])
def test_metadata_from_any_python_names_pathlib_its_way(tmp_path, monkeypatch, module):
    """.metadata pickles the checkpoint's path, and pickle names its class by
    the module of the Python that wrote it: pathlib before 3.13, pathlib._local
    from 3.13 (found by make test-compat on 3.13). Both load on any Python."""
    from ckptio.distributed import StorageReader

    ckpt = tmp_path / "ck"
    _save_no_dist(str(ckpt), {"w": torch.arange(8.0)}, writer="stock")
    with open(ckpt / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    assert isinstance(metadata.storage_meta.checkpoint_id, pathlib.PurePath)
    with monkeypatch.context() as m:  # write the pickle as a Python whose pathlib is `module` would
        m.setitem(sys.modules, module, pathlib)
        m.setattr(type(metadata.storage_meta.checkpoint_id), "__module__", module)
        data = pickle.dumps(metadata)
    assert module.encode() + b"\x94\x8c\x09PosixPath" in data
    (ckpt / ".metadata").write_bytes(data)
    assert StorageReader(str(ckpt)).read_metadata().storage_meta.checkpoint_id == metadata.storage_meta.checkpoint_id
    out = {"w": torch.zeros(8)}
    dcp.load(out, storage_reader=StorageReader(str(ckpt)), no_dist=True)
    assert torch.equal(out["w"], torch.arange(8.0))
