"""What differs between the Python and torch releases ckptio supports, in one
place. Each helper says which release changed what, and what ckptio does on
either side. `make test-compat` runs the core tests on the oldest and newest
releases (docs/install.md)."""

from __future__ import annotations

import copyreg
import os
from typing import Any

import torch

# DCP's `.metadata` file name (torch.distributed.checkpoint.filesystem._metadata_fn).
_DCP_METADATA_NAME = ".metadata"

# Where pickles say pathlib's classes live: Python 3.13 moved them into
# pathlib._local, and a pickle names a class by the module of the Python that
# wrote it, so a checkpoint from either side must resolve on the other.
PATHLIB_MODULES = ("pathlib", "pathlib._local")


def tensor_state_is_instance_dict() -> bool:
    """Whether torch._utils._get_obj_state(t) of a plain tensor is just its
    instance dict (None when empty): true while torch.Tensor keeps object's
    __getstate__ and has no slots. Python 3.11 gave object a __getstate__;
    before it neither has one, and _get_obj_state falls back to __dict__ the
    same way."""
    default = getattr(object, "__getstate__", None)
    return (getattr(torch.Tensor, "__getstate__", None) is default
            and not copyreg._slotnames(torch.Tensor))  # type: ignore[attr-defined]  # private, absent from typeshed


def dcp_uses_collectives(storage: Any) -> bool:
    """Whether a DCP FileSystemWriter/Reader runs with collectives (one
    `.metadata` for all ranks). torch 2.9 added the non-collective mode (each
    rank its own `__<rank>.metadata`, `use_collectives=False`); before it every
    save was collective."""
    return getattr(storage, "use_collectives", True)


def dcp_metadata_path(storage: Any, rank: int | None = None) -> str:
    """The `.metadata` path a DCP FileSystemWriter/Reader uses for `rank`
    (None: the collective one). torch 2.9 added `_get_metadata_path`; before it
    there was only the collective `<path>/.metadata`."""
    get_path = getattr(storage, "_get_metadata_path", None)
    if get_path is not None:
        return os.fspath(get_path(rank))
    return os.path.join(os.fspath(storage.path), _DCP_METADATA_NAME)
