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
  it); they are listed in the result. Non-contiguous tensors are written
  contiguous.
- sparse, quantized, nested and other non-dense tensors, and dtypes
  safetensors has no code for, are refused, naming the tensor.

The file is written under a temporary name, fsynced and renamed into place:
a failed export leaves whatever was at the destination untouched. It is
written here, in safetensors' documented layout (an 8-byte header length, a
JSON header, the tensors' bytes), straight from the tensors' memory: neither
the safetensors package nor numpy is needed, and no second copy of the
weights is made.
"""

from __future__ import annotations

import ctypes
import json
import sys
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

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
        if storage.nbytes() and storage.data_ptr() in seen_storages:
            copied.append(name)  # its bytes are written again for it: safetensors entries never share
        seen_storages.add(storage.data_ptr())
        out[name] = t.contiguous()  # a copy only for a non-contiguous view
    nbytes = sum(t.nbytes for t in out.values())
    return out, ExportResult("", len(out), nbytes, left_out, copied)


def export_safetensors(obj: object, path: str, *, tensors_only: bool = False) -> ExportResult:
    """Write `obj`'s tensors to `path` (.safetensors), durably; see the module docstring."""
    from ._paths import committed_file

    tensors, result = tensors_for_safetensors(obj, tensors_only=tensors_only)
    if sys.byteorder != "little":
        raise CannotExportError("safetensors files are little-endian; exporting on a big-endian machine is not "
                                "supported")
    header, order = _layout(tensors)
    with committed_file(path, site="safetensors") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name in order:
            _write_tensor_bytes(f, tensors[name])
    result.path = path
    return result


def _layout(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[str]]:
    """The JSON header (padded with spaces so the data starts 8-byte aligned)
    and the order the tensors' bytes follow it in: largest element size first,
    then by name, as safetensors itself writes them, so every tensor starts
    aligned to its element size."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        t = tensors[name]
        entries[name] = {"dtype": _DTYPES[str(t.dtype).replace("torch.", "")], "shape": list(t.shape),
                         "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8), order


def _write_tensor_bytes(f: IO[bytes], t: torch.Tensor) -> None:
    """A contiguous CPU tensor's bytes, written from its memory (no copy, no numpy)."""
    if t.nbytes:
        f.write(memoryview((ctypes.c_char * t.nbytes).from_address(t.data_ptr())))


# torch dtype name -> safetensors dtype name (safetensors' own table, safetensors.torch._TYPES).
_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2": "F8_E5M2",
    "float8_e5m2fnuz": "F8_E5M2FNUZ", "complex64": "C64",
}


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
    dtype = str(t.dtype).replace("torch.", "")
    if dtype not in _DTYPES:
        raise CannotExportError(f"safetensors has no dtype for {name!r} ({dtype})")
