"""Power loss: every state a power cut during a save may leave still holds a
whole checkpoint, old or new, and a save reported done survives.

Each scenario runs a real save path under the recorder of crash_sim.py,
twice over (the second save replaces the first), and every crash state is
replayed into a real directory and loaded. The mutation proof then leaves
out each fsync of the commit in turn and requires the simulator to report a
violation: the harness is known to be able to fail.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import ckptio
from ckptio import _testing
from ckptio.plugins import AsyncCheckpointIO, FastCheckpointIO, TorchCheckpointIO
from crash_sim import ABSENT, check_recording, recording

pytestmark = pytest.mark.slow

VERSIONS = (1, 2, 3)


W_SIZE = 24_000  # ~96 KiB: two dozen 4 KiB blocks, so partial persistence has room to show


def make_state(version: int) -> dict:
    g = torch.Generator().manual_seed(version)
    return {"version": version, "w": torch.randn(W_SIZE, generator=g), "b": torch.randn(40, generator=g).double(),
            "nested": [torch.arange(version, version + 7)]}


def expect_version(state, where: str) -> int:
    version = state["version"]
    version = int(version.item()) if isinstance(version, torch.Tensor) else int(version)
    want = make_state(version)
    for key in ("w", "b"):
        if not torch.equal(state[key], want[key]):
            raise AssertionError(f"{where}: {key!r} does not match version {version}")
    if "nested" in state and not torch.equal(state["nested"][0], want["nested"][0]):
        raise AssertionError(f"{where}: nested does not match version {version}")
    return version


# --- checkers: which version does a user find in a replayed directory? ------------

def file_checker(relative: str):
    def check(directory):
        path = os.path.join(directory, relative)
        if not os.path.exists(path):
            return ABSENT
        ckptio.verify(path)
        loaded = expect_version(ckptio.load(path), path)
        if expect_version(torch.load(path, weights_only=True), path) != loaded:
            raise AssertionError("torch.load and ckptio.load disagree")
        return loaded
    return check


def manager_checker(relative: str):
    def check(directory):
        run = os.path.join(directory, relative)
        if not os.path.isdir(run):
            return ABSENT
        manager = ckptio.CheckpointManager(run, keep_last=2)
        pointer = os.path.join(run, "latest")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = expect_version(manager.load_latest(), run)
        except ckptio.CheckpointNotFoundError:
            if os.path.exists(pointer):
                raise AssertionError("`latest` exists but no checkpoint loads") from None
            return ABSENT
        if not os.path.exists(pointer):
            return ABSENT  # as `latest` sees it: fine before the first save returned, never after
        # `latest` must name a whole checkpoint. It may lag what loads while a
        # save is in flight, never once the save has returned: the older of
        # the two is what counts against the last save reported done.
        with open(pointer) as f:
            named = os.path.join(run, f.read().strip())
        if not os.path.isfile(named):
            raise AssertionError(f"`latest` names {named!r}, which is not there")
        return min(found, expect_version(ckptio.load(named), named))
    return check


def dcp_checker(relative: str):
    import torch.distributed.checkpoint as dcp

    from ckptio.distributed import StorageReader

    def check(directory):
        path = os.path.join(directory, relative)
        if not os.path.exists(os.path.join(path, ".metadata")):
            return ABSENT  # clearly refuses: no checkpoint here
        target = {"version": torch.zeros((), dtype=torch.int64), "w": torch.zeros(W_SIZE),
                  "b": torch.zeros(40, dtype=torch.float64)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(target, storage_reader=StorageReader(path), no_dist=True)
        return expect_version(target, path)
    return check


# --- scenarios: each saves VERSIONS in turn through one real path ---------------------

def _save_then(save, finish=lambda handle: None):
    def run(root, rec):
        for version in VERSIONS:
            rec.mark(f"start:{version}")
            finish(save(root, version))
            rec.mark(f"done:{version}")
    return run


def _plugin(make):
    plugin = make()

    def save(root, version):
        return plugin.save_checkpoint(make_state(version), os.path.join(root, "checkpoints", "last.ckpt"))
    return save


def _wait(handle):
    handle.result()


def _manager_run(async_save):
    def run(root, rec):
        manager = ckptio.CheckpointManager(os.path.join(root, "run"), keep_last=2, async_save=async_save)
        for version in (1, 2, 3, 4):
            rec.mark(f"start:{version}")
            handle = manager.save(version, make_state(version))
            if async_save:
                handle.result()
            rec.mark(f"done:{version}")
        manager.close()
    return run


def _dcp_run(root, rec):
    import torch.distributed.checkpoint as dcp

    from ckptio.distributed import StorageWriter

    for version in VERSIONS:
        rec.mark(f"start:{version}")
        state = make_state(version)
        state = {"version": torch.tensor(version), "w": state["w"], "b": state["b"]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, storage_writer=StorageWriter(os.path.join(root, "dcp")), no_dist=True)
        rec.mark(f"done:{version}")


SCENARIOS = {
    "ckptio.save": (_save_then(lambda root, v: ckptio.save(make_state(v), os.path.join(root, "model.pt"))),
                    file_checker("model.pt"), False),
    "ckptio.async_save": (_save_then(lambda root, v: ckptio.async_save(make_state(v), os.path.join(root, "model.pt")),
                                     _wait), file_checker("model.pt"), False),
    "FastCheckpointIO": (_save_then(_plugin(FastCheckpointIO)), file_checker("checkpoints/last.ckpt"), False),
    "TorchCheckpointIO": (_save_then(_plugin(TorchCheckpointIO)), file_checker("checkpoints/last.ckpt"), False),
    "AsyncCheckpointIO(FastCheckpointIO)": (_save_then(_plugin(lambda: AsyncCheckpointIO(FastCheckpointIO())), _wait),
                                            file_checker("checkpoints/last.ckpt"), False),
    "AsyncCheckpointIO(TorchCheckpointIO)": (_save_then(_plugin(lambda: AsyncCheckpointIO(TorchCheckpointIO())), _wait),
                                             file_checker("checkpoints/last.ckpt"), False),
    "CheckpointManager (async)": (_manager_run(True), manager_checker("run"), False),
    "CheckpointManager (sync)": (_manager_run(False), manager_checker("run"), False),
    # DCP replaces rank files under their own names: mid-save it may refuse (no .metadata).
    "DCP StorageWriter": (_dcp_run, dcp_checker("dcp"), True),
}


def simulate(name, tmp_path):
    run, checker, refusal_in_flight = SCENARIOS[name]
    root, scratch = tmp_path / "root", tmp_path / "replay"
    root.mkdir()
    scratch.mkdir()
    with recording(str(root)) as rec:
        run(str(root), rec)
    ckptio.wait()
    return check_recording(rec, checker, str(scratch), refusal_in_flight=refusal_in_flight)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_power_loss_state_recovers(name, tmp_path):
    report = simulate(name, tmp_path)
    _record_counts(name, report)
    assert report.windows > 10 and report.distinct_states > 10, report  # the recorder saw the save
    assert not report.violations, "\n".join(report.violations[:10])


# Each fsync of a commit, left out in turn, and a path that needs it.
MUTATIONS = {
    "engine.file": "ckptio.save",
    "engine.directory": "ckptio.save",
    "torch_save.file": "TorchCheckpointIO",
    "torch_save.directory": "TorchCheckpointIO",
    "new_directory": "FastCheckpointIO",
    "pointer.file": "CheckpointManager (sync)",
    "pointer.directory": "CheckpointManager (sync)",
    "dcp.shard.file": "DCP StorageWriter",
    "dcp.shard.directory": "DCP StorageWriter",
    "dcp.metadata.file": "DCP StorageWriter",
    "dcp.metadata.directory": "DCP StorageWriter",
    "dcp.retire_metadata.directory": "DCP StorageWriter",
}


def test_every_fsync_site_has_a_mutation():
    assert set(MUTATIONS) == set(_testing.FSYNC_SITES)


@pytest.mark.parametrize("site", list(MUTATIONS))
def test_simulator_catches_a_missing_fsync(site, tmp_path):
    with _testing.skip_fsyncs(site):
        report = simulate(MUTATIONS[site], tmp_path)
    _record_counts(f"without {site}", report)
    assert report.violations, f"leaving out {site} went unnoticed over {report.distinct_states} states"


def _record_counts(name, report) -> None:
    """Counts for the reliability table in docs/reliability.md (CKPTIO_POWER_LOSS_COUNTS=<file>)."""
    out = os.environ.get("CKPTIO_POWER_LOSS_COUNTS")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"case": name, "windows": report.windows, "states": report.states,
                                "distinct_states": report.distinct_states,
                                "violations": len(report.violations)}) + "\n")
