"""Registering ckptio's plugin classes with the Lightning packages installed.

Lightning checks plugins with ``isinstance(plugin, CheckpointIO)`` against
its own classes, and ``lightning`` and ``pytorch_lightning`` are two separate
class hierarchies. Each ckptio plugin class says which of Lightning's
classes it stands for (``@stands_for("CheckpointIO")``) and is registered as
a virtual subclass (``ABCMeta.register``) of that class in every installed
package, once, when the first ckptio plugin is created. Lightning stays
optional: nothing is imported from it before then.

Imports flow one way: the plugin modules import this one; this one imports
no ckptio module (ckptio.lightning re-exports register_plugins).
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["stands_for", "register_plugins", "registered_namespaces"]

# Where each Lightning distribution keeps CheckpointIO (the Trainer re-exports it).
_FABRIC_IO_MODULES = {"lightning": "lightning.fabric.plugins.io", "pytorch_lightning": "lightning_fabric.plugins.io"}
_classes: list[tuple[str, type]] = []  # (name of Lightning's class, ckptio class)
_lock = threading.Lock()
_registered: list[str | None] = []
_Class = TypeVar("_Class", bound=type)


def stands_for(lightning_class: str) -> Callable[[_Class], _Class]:
    """Class decorator: register the class with Lightning's `lightning_class`."""
    def mark(cls: _Class) -> _Class:
        _classes.append((lightning_class, cls))
        return cls
    return mark


def _installed(top: str) -> bool:
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def register_plugins() -> list[str]:
    """Register ckptio's plugin classes with every installed Lightning; returns their names."""
    with _lock:
        if _registered:
            return [n for n in _registered if n]
        for top, module in _FABRIC_IO_MODULES.items():
            if not _installed(top) or not _installed(module.split(".")[0]):
                continue
            io = importlib.import_module(module)
            for lightning_class, cls in _classes:
                getattr(io, lightning_class).register(cls)
            _registered.append(top)
        if not _registered:
            _registered.append(None)  # nothing installed; do not look again
        return [n for n in _registered if n]


def registered_namespaces() -> list[str]:
    return [n for n in _registered if n]
