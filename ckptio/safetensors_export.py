"""Exporting a checkpoint's tensors to a ``.safetensors`` file, the format
models are usually published in (`ckptio convert CKPT OUT.safetensors`).

safetensors holds a flat {name: dense tensor} map and nothing else, so the
export states its policy rather than guessing:

- names: nested dicts, lists and tuples flatten to dotted names, as a
  ``state_dict`` is named (``{"model": {"w": t}}`` -> ``"model.w"``; list items
  by index: ``"layers.0"``). Two paths that flatten to one name are refused.
- values that are not tensors (a step count, a config string, None) are
  refused, naming them, unless ``tensors_only=True`` leaves them out (they
  are listed in the result).
- tensors that share or overlap storage (tied weights, views of one buffer)
  are each written as their own copy: the values are exact, but loading the
  file gives separate tensors (re-tie them after loading if the model needs
  it). Non-contiguous tensors are written contiguous. Both are listed in the
  result.
- sparse, quantized, nested and other non-dense tensors, and dtypes
  safetensors has no code for, are refused, naming the tensor.

The file is written under a temporary name, fsynced and renamed into place:
a failed export leaves whatever was at the destination untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["CannotExportError", "ExportResult", "export_safetensors", "tensors_for_safetensors"]


class CannotExportError(ValueError):
    """The object holds something safetensors cannot represent."""


@dataclass
class ExportResult:
    path: str
    tensors: int
    bytes: int
    left_out: list[str] = field(default_factory=list)  # non-tensor values dropped (tensors_only)
    copied_shared: list[str] = field(default_factory=list)  # tensors that shared storage, written as copies


def tensors_for_safetensors(obj: object, *, tensors_only: bool = False) -> tuple[dict[str, torch.Tensor], ExportResult]:
    """The {name: tensor} map safetensors can save from `obj`, by the policy
    above, and the result describing what was left out or copied."""
    import torch

    flat: dict[str, torch.Tensor] = {}
    left_out: list[str] = []
    for name, value in _flatten(obj, ""):
        if name in flat:
            raise CannotExportError(f"two entries flatten to the same safetensors name {name!r}")
        if isinstance(value, torch.Tensor):
            _check_dense(name, value)
            flat[name] = value
        elif tensors_only:
            left_out.append(name)
        else:
            raise CannotExportError(
                f"safetensors holds only tensors, and {name or '<root>'!r} is {_a(type(value).__name__)}; "
                "pass --tensors-only to leave non-tensor values out")
    if not flat:
        raise CannotExportError("the checkpoint holds no tensors to write")
    out: dict[str, torch.Tensor] = {}
    copied: list[str] = []
    seen_storages: set[int] = set()
    for name, t in flat.items():
        t = t.detach().cpu()
        storage = t.untyped_storage()
        shares = storage.data_ptr() in seen_storages and storage.nbytes() > 0
        seen_storages.add(storage.data_ptr())
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.nbytes == storage.nbytes()
        if shares or not whole:
            # safetensors refuses tensors that share memory: each is written as its own copy.
            if shares:
                copied.append(name)
            t = t.contiguous().clone()
        out[name] = t
    nbytes = sum(t.nbytes for t in out.values())
    return out, ExportResult("", len(out), nbytes, left_out, copied)


def export_safetensors(obj: object, path: str, *, tensors_only: bool = False) -> ExportResult:
    """Write `obj`'s tensors to `path` (.safetensors), durably; see the module docstring."""
    from safetensors.torch import save_file

    from ._paths import fsync_directory, temporary_path

    tensors, result = tensors_for_safetensors(obj, tensors_only=tensors_only)
    tmp = temporary_path(path)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_directory(os.path.dirname(path) or ".")
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    result.path = path
    return result


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def _flatten(obj: object, prefix: str) -> list[tuple[str, object]]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    items: list[tuple[str, object]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            items += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            items += _flatten(v, f"{prefix}.{i}" if prefix else str(i))
    else:
        items.append((prefix, obj))
    return items


def _check_dense(name: str, t: torch.Tensor) -> None:
    import torch

    if t.layout != torch.strided or t.is_quantized or getattr(t, "is_nested", False):
        raise CannotExportError(f"safetensors holds only dense tensors, and {name!r} is {t.layout} "
                                f"{'quantized ' if t.is_quantized else ''}{type(t).__name__}")
    try:
        from safetensors.torch import _SIZE as supported  # dtype -> size: what safetensors can name
    except ImportError:  # an older/newer layout of the module: save_file will say
        return
    if t.dtype not in supported:
        raise CannotExportError(f"safetensors has no dtype for {name!r} ({str(t.dtype).replace('torch.', '')})")
