"""An unpickler that names only allowlisted globals and writes only into
objects the pickle itself made.

An allowlist of globals alone is not enough: CPython's unpickler lets BUILD
(``__setstate__`` or a ``__dict__`` update), SETITEM and APPEND act on any
object on its stack, an allowlisted class or function included. A pickle that
calls nothing could set an attribute of ``pathlib.PosixPath`` or of a DCP
metadata class, or a member of an Enum, and so change every later load in
the process. Each of those opcodes is restricted here by the type of its
target, as torch's weights-only unpickler restricts them: BUILD on an
instance of an allowlisted class (never the class itself, never an Enum
member, which is shared), SETITEM(S) on dicts, APPEND(S) on lists,
ADDITEMS on sets; REDUCE and NEWOBJ only on allowlisted globals. A refusal
raises UnsafeCheckpointError naming the file and the opcode.

It runs CPython's pure-Python unpickler (its dispatch table can be
overridden; the C one's cannot), as torch's weights-only unpickler does:
meant for metadata, not for per-tensor hot paths (ckptio.skeleton has the
fast path, checked by the engine instead).
"""

from __future__ import annotations

import collections
import enum
import io
import pickle
from collections.abc import Callable, Mapping
from typing import Any, cast

from .errors import UnsafeCheckpointError

__all__ = ["AllowlistUnpickler"]

class AllowlistUnpickler(pickle._Unpickler):  # the pure-Python unpickler
    """Unpickles `data` allowing the globals in `allowed` ('module.name' ->
    object) and nothing that writes into a shared object. Refusals raise
    UnsafeCheckpointError(path=path, record=record)."""

    dispatch = dict(pickle._Unpickler.dispatch)  # the guards below replace some entries
    stack: list[Any]  # the unpickler's own state, read by the guards
    metastack: list[list[Any]]

    def __init__(self, data: bytes, allowed: Mapping[str, Any], *, path: str, record: str, why: str = "") -> None:
        super().__init__(io.BytesIO(data))
        self._allowed = dict(allowed)
        self._allowed_ids = {id(obj) for obj in self._allowed.values()}
        self._buildable = {obj for obj in self._allowed.values()
                           if isinstance(obj, type) and obj is not type and not issubclass(obj, enum.Enum)}
        self._buildable.add(collections.OrderedDict)
        self._path = path
        self._record = record
        self._why = why  # appended to a refused global's message: what this reader allows and how to add to it

    def refuse(self, what: str, refused: tuple[str, ...] = ()) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{self._path}: refused {what} in {self._record}", path=self._path,
                                     record=self._record, refused=refused)

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key not in self._allowed:
            raise UnsafeCheckpointError(f"{self._path}: refused to unpickle global {key!r}{self._why}",
                                        path=self._path, record=self._record, refused=[key])
        return self._allowed[key]

    def persistent_load(self, pid: Any) -> Any:
        raise self.refuse("a persistent id")

    # --- the opcodes that act on an object already on the stack -------------

    def _target(self, depth: int = 1) -> Any:
        return self.stack[-depth] if len(self.stack) >= depth else None

    def _check_global(self, opcode: str, obj: Any) -> None:
        if id(obj) not in self._allowed_ids:
            raise self.refuse(f"{opcode} of {type(obj).__name__} (not an allowlisted global)")

    def _check_type(self, opcode: str, target: Any, allowed: tuple[type, ...]) -> None:
        if type(target) not in allowed or id(target) in self._allowed_ids:
            raise self.refuse(f"{opcode} on {_describe(target)}")


def _describe(obj: Any) -> str:
    return f"the class {obj.__qualname__}" if isinstance(obj, type) else f"a {type(obj).__qualname__}"


def _guard(opcode: str, check: Callable[[AllowlistUnpickler], None]) -> None:
    """Runs check(unpickler) before CPython's own handler of `opcode`."""
    code = getattr(pickle, opcode)[0]
    handler = pickle._Unpickler.dispatch[code]

    def guarded(self: pickle.Unpickler) -> None:  # typeshed types the dispatch table so
        check(cast(AllowlistUnpickler, self))
        handler(self)

    AllowlistUnpickler.dispatch[code] = guarded


def _mark_top(u: AllowlistUnpickler) -> Any:
    """The object under the topmost MARK (what SETITEMS/APPENDS/ADDITEMS act on)."""
    return u.metastack[-1][-1] if u.metastack and u.metastack[-1] else None


def _check_build(u: AllowlistUnpickler) -> None:
    target = u._target(2)
    if type(target) not in u._buildable or id(target) in u._allowed_ids:
        raise u.refuse(f"BUILD on {_describe(target)}")


_DICTS = (dict, collections.OrderedDict, collections.Counter)
_guard("BUILD", _check_build)
_guard("SETITEM", lambda u: u._check_type("SETITEM", u._target(3), _DICTS))
_guard("SETITEMS", lambda u: u._check_type("SETITEMS", _mark_top(u), _DICTS))
_guard("APPEND", lambda u: u._check_type("APPEND", u._target(2), (list,)))
_guard("APPENDS", lambda u: u._check_type("APPENDS", _mark_top(u), (list,)))
_guard("ADDITEMS", lambda u: u._check_type("ADDITEMS", _mark_top(u), (set,)))
_guard("REDUCE", lambda u: u._check_global("REDUCE", u._target(2)))
_guard("NEWOBJ", lambda u: u._check_global("NEWOBJ", u._target(2)))
_guard("NEWOBJ_EX", lambda u: u._check_global("NEWOBJ_EX", u._target(3)))
_guard("OBJ", lambda u: u._check_global("OBJ", u.stack[0] if u.stack else None))


def _refuse_extension(u: AllowlistUnpickler) -> None:
    raise u.refuse("a copyreg extension code (EXT1/EXT2/EXT4)")


for _ext in ("EXT1", "EXT2", "EXT4"):  # never in what we read
    _guard(_ext, _refuse_extension)
