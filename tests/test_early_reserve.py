"""No first-save cliff: once something will save asynchronously, the first
optimizer step grows every staging slot to the checkpoint's size in the
background, so the first save (and the second, which finds the other slot
free) copies into memory that is already faulted in."""

import torch

import ckptio
from ckptio.background import get_arena, reserve_before_saves, reset
from ckptio.early_reserve import estimated_checkpoint_bytes
from ckptio.pickling import pickle_state
from ckptio.staging import page_round


def _train_one_step():
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.BatchNorm1d(512), torch.nn.Linear(512, 64))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 256)).sum().backward()
    opt.step()
    return model, opt


def _capacities():
    return [slot.capacity for slot in get_arena()._slots]


def test_the_estimate_covers_the_checkpoint_the_optimizer_makes():
    model, opt = _train_one_step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}
    needed = sum(page_round(n) for n in pickle_state(state, "x.pt").nbytes)
    estimate = estimated_checkpoint_bytes([opt])
    assert needed <= estimate <= needed * 1.1 + (8 << 20)


def test_the_first_step_faults_every_slot_in_so_the_first_saves_do_not(tmp_path):
    reset()
    try:
        reserve_before_saves()
        assert _capacities() == [0, 0]
        model, opt = _train_one_step()  # the hook measures the optimizer at this step
        get_arena().join_background()
        reserved = _capacities()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        needed = sum(page_round(n) for n in pickle_state(state, "x.pt").nbytes)
        assert all(c >= needed for c in reserved), (reserved, needed)
        first = ckptio.async_save(state, tmp_path / "a.pt")
        second = ckptio.async_save(state, tmp_path / "b.pt")  # overlaps the first's write: the other slot
        first.wait(), second.wait()
        assert _capacities() == reserved  # neither save had to grow (fault) a slot on this thread
        assert torch.equal(ckptio.load(tmp_path / "b.pt")["model"]["0.weight"], model[0].weight)
    finally:
        reset()


def test_a_bare_async_save_reserves_only_what_it_saved(tmp_path):
    """async_save may save anything (a metrics dict beside a large model):
    it never reserves the optimizers' size, only the first save's own."""
    reset()
    try:
        _train_one_step()
        assert _capacities() == [0, 0]  # nothing asked for a reservation
        ckptio.async_save({"loss": torch.ones(10)}, tmp_path / "small.pt").wait()
        _train_one_step()
        get_arena().join_background()
        assert max(_capacities()) < (1 << 20)
    finally:
        reset()


def test_an_async_checkpoint_io_reserves_at_the_first_step_and_an_explicit_size_replaces_it():
    reset()
    try:
        ckptio.AsyncCheckpointIO(reserve=1 << 20)
        _train_one_step()
        get_arena().join_background()
        assert max(_capacities()) < (4 << 20)  # the explicit size, not the optimizers' estimate
        reset()
        ckptio.AsyncCheckpointIO()
        model, opt = _train_one_step()
        get_arena().join_background()
        assert min(_capacities()) >= estimated_checkpoint_bytes([opt])
    finally:
        reset()
