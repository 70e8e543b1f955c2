"""The native pickler (csrc/python/native_pickler.cc) writes exactly what
pickle.Pickler writes, or leaves the object to it.

Each case pickles one object both ways through ckptio.pickling.pickle_state
(the native writer on and off) and compares data.pkl byte for byte, and the
storages listed and their order. Together with test_roundtrip's comparisons
against torch.save, that makes the native writer's output torch.save's.
"""

from __future__ import annotations

import collections
import enum
import random
from collections import OrderedDict

import pytest
import torch

from ckptio import _C
from ckptio import pickling


def _pickled(obj, native: bool, monkeypatch):
    monkeypatch.setattr(pickling, "_use_native_pickler", native)
    state = pickling.pickle_state(obj, "case.pt")
    return state.head[0][1], [s._cdata for s in state.storages], state.locations, state.nbytes, state.device_types


def assert_native_matches_pickle(obj, monkeypatch):
    native = _pickled(obj, True, monkeypatch)
    reference = _pickled(obj, False, monkeypatch)
    assert native[0] == reference[0], _first_difference(native[0], reference[0])
    assert native[1:] == reference[1:]


def _first_difference(a: bytes, b: bytes) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"pickles differ at byte {i} of {len(a)}/{len(b)}: {a[i - 16:i + 16]!r} vs {b[i - 16:i + 16]!r}"


def native_handles(obj) -> bool:
    """Whether the native writer wrote `obj` itself (it answers None when it
    leaves an object to pickle.Pickler)."""
    calls = []
    original = _C.pickle_protocol2

    def spy(*args):
        result = original(*args)
        calls.append(result is not None)
        return result

    pickling._C.pickle_protocol2 = spy  # the module object is shared: restore below
    try:
        pickling.pickle_state(obj, "case.pt")
    finally:
        pickling._C.pickle_protocol2 = original
    return calls == [True]


class Color(enum.IntEnum):
    RED = 1


class Plain:
    def __init__(self):
        self.weights = torch.ones(3)
        self.name = "plain"


class Slots:
    __slots__ = ("a", "b")

    def __init__(self):
        self.a, self.b = 1, torch.zeros(2)


class Holder(torch.Tensor):
    pass


class ListOf(list):
    """Pickled through a reduction whose list items come from an iterator."""


def _model_checkpoint():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 6)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()], "epoch": 3, "global_step": 2**40,
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
            "hyper_parameters": {"lr": 1e-3, "betas": (0.9, 0.999), "name": "run", "layers": [6, 4, 2]},
            "pytorch-lightning_version": "2.6.6"}


base = torch.arange(64, dtype=torch.float32)
CASES = {
    "scalars": [None, True, False, 0, 1, -1, 255, 256, 65535, 65536, -129, 2**31 - 1, 2**31, -(2**31),
                -(2**31) - 1, 2**63, -(2**63), 2**64 + 1, -(2**2047), 2**2100, -(2**2048), 0.0, -0.0, 1.5,
                float("inf"), float("nan"), 1e-310],
    "strings": ["", "a", "storage", "cpu", "é", "日本", "\ud800 lone surrogate", "x" * 70000],
    "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), ((),), ((1,), (1,)), ("a",) * 300],
    "batches": {"d999": dict.fromkeys(range(999)), "d1000": dict.fromkeys(range(1000)),
                "d2000": dict.fromkeys(range(2000)), "d1001": dict.fromkeys(range(1001)),
                "l1": [1], "l1000": list(range(1000)), "l1001": list(range(1001)), "l2000": list(range(2000)),
                "od1": OrderedDict(a=1), "od1000": OrderedDict.fromkeys(range(1000)),
                "od1001": OrderedDict.fromkeys(range(1001)), "sub1": ListOf([1]), "sub2": ListOf([1, 2]),
                "sub1000": ListOf(range(1000)), "sub1001": ListOf(range(1001))},
    "shared_objects": (lambda s, t: {"a": s, "b": s, "c": [t, t], "d": (t, s)})("shared", torch.ones(2)),
    "views_of_one_storage": [base[:3], base[3:], base.view(8, 8), base[:3], base[::2]],
    "special_tensors": {"param": torch.nn.Parameter(torch.randn(3)), "frozen": torch.nn.Parameter(
        torch.randn(2), requires_grad=False), "conj": torch.randn(3, dtype=torch.complex64).conj(),
        "subclass": torch.ones(2).as_subclass(Holder), "uint16": torch.arange(4).to(torch.uint16),
        "scalar": torch.tensor(2.0), "empty": torch.empty(0, 3), "grad": torch.ones(2, requires_grad=True),
        "channels_last": torch.randn(1, 2, 3, 3).to(memory_format=torch.channels_last)},
    "objects": [Plain(), Slots(), Color.RED, collections.Counter("abca"), 1 + 2j, range(3),
                torch.float16, torch.device("cpu"), torch.Size([2, 3]), int, OrderedDict, torch.Tensor, len],
    "model_checkpoint": _model_checkpoint(),
    "many_memo_entries": [str(i) for i in range(400)] + [torch.ones(1) for _ in range(300)],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_native_pickle_equals_pickle(name, monkeypatch):
    assert_native_matches_pickle(CASES[name], monkeypatch)


def test_checkpoints_are_written_natively():
    # Without this, a writer that always gave up would pass every test above.
    assert native_handles(CASES["model_checkpoint"])
    assert native_handles({"model": {f"w{i}": torch.randn(2) for i in range(50)}, "step": 7})
    assert native_handles(CASES["objects"])


@pytest.mark.parametrize("obj", [{"bytes": b"abc"}, [{1, 2}], frozenset([3])], ids=["bytes", "set", "frozenset"])
def test_what_the_writer_leaves_to_pickle_still_matches(obj, monkeypatch):
    assert not native_handles(obj)
    assert_native_matches_pickle(obj, monkeypatch)


def test_recursive_structures(monkeypatch):
    looped = [1]
    looped.append(looped)
    holder = []
    inner = (holder, 2)
    holder.append(inner)
    wide = []
    wide_tuple = (wide, 1, 2, 3, 4)
    wide.append(wide_tuple)
    assert_native_matches_pickle({"list": looped, "tuple": inner, "wide": wide_tuple}, monkeypatch)


def _random_value(rng: random.Random, depth: int, pool: list):
    kind = rng.randrange(12 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([None, True, False, rng.randint(-(2**70), 2**70), rng.randint(-300, 70000)])
    if kind == 1:
        return rng.random() * 10 ** rng.randint(-5, 5)
    if kind == 2:
        return rng.choice(["", "k", "storage", "cpu", "0", "1", str(rng.random())])
    if kind in (3, 4):
        t = torch.randn(rng.randint(0, 5), rng.randint(1, 3))
        if rng.random() < 0.3:
            t = t.t()
        pool.append(t)
        return t
    if kind == 5 and pool:
        return rng.choice(pool)  # the same object again: a memo hit
    if kind == 5:
        return 0
    if kind == 6:
        return [_random_value(rng, depth + 1, pool) for _ in range(rng.randint(0, 6))]
    if kind == 7:
        return tuple(_random_value(rng, depth + 1, pool) for _ in range(rng.randint(0, 6)))
    if kind == 8:
        return {rng.choice(["a", "b", "c", str(rng.randint(0, 9))]): _random_value(rng, depth + 1, pool)
                for _ in range(rng.randint(0, 6))}
    if kind == 9:
        return OrderedDict((str(i), _random_value(rng, depth + 1, pool)) for i in range(rng.randint(0, 4)))
    if kind == 10:
        view_base = rng.choice(pool) if pool else torch.randn(10)
        return view_base.as_strided((max(1, view_base.numel() // 2),), (1,)) if view_base.numel() else view_base
    return torch.nn.Parameter(torch.randn(2)) if rng.random() < 0.5 else Color.RED


@pytest.mark.parametrize("seed", range(40))
def test_random_structures(seed, monkeypatch):
    rng = random.Random(seed)
    pool: list = []
    obj = {f"k{i}": _random_value(rng, 0, pool) for i in range(8)}
    assert_native_matches_pickle(obj, monkeypatch)


def test_errors_from_python_code_propagate_unchanged():
    class Refuses:
        def __reduce_ex__(self, protocol):
            raise ValueError("this object refuses to be pickled")

    with pytest.raises(ValueError, match="refuses to be pickled"):
        pickling.pickle_state({"ok": torch.ones(1), "bad": Refuses()}, "case.pt")
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError, match="view the same data as different types"):
        pickling.pickle_state([shared, shared.view(torch.int32)], "case.pt")


def test_deep_nesting_is_left_to_pickle(monkeypatch):
    deep = current = []
    for _ in range(200):
        current.append([])
        current = current[0]
    assert_native_matches_pickle(deep, monkeypatch)
    too_deep = current = []
    for _ in range(100_000):
        current.append([])
        current = current[0]
    with pytest.raises(RecursionError):  # pickle's own verdict, not a crash
        pickling.pickle_state(too_deep, "case.pt")
