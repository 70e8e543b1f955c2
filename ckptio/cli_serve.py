"""``ckptio serve``: start, inspect or stop the per-node checkpoint service.

    ckptio serve                 start it in the background (if it is not running) and print its pid
    ckptio serve --foreground    run it here, under a supervisor or a job prolog, until idle or SIGTERM
    ckptio serve --status        one line: pid, clients, pending writes, writes served, memory-tier images
    ckptio serve --stop          ask it to finish its pending writes and exit (SIGTERM)

Trainers start the service on demand (CKPTIO_SERVICE=1 or a manager with a
memory tier): these are for operators. The service serves the directory
CKPTIO_SERVICE_DIR (default /dev/shm/ckptio-<uid>).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any

from .cli_outcome import CliFailure, Exit

__all__ = ["add_serve_command", "cmd_serve"]


def add_serve_command(command: object) -> None:
    p = command("serve", "start, inspect or stop the per-node checkpoint service")  # type: ignore[operator]
    what = p.add_mutually_exclusive_group()
    what.add_argument("--foreground", action="store_true", help="run the service in this process until it is idle")
    what.add_argument("--status", action="store_true", help="print the running service's state")
    what.add_argument("--stop", action="store_true", help="let it finish pending writes, then exit")
    p.set_defaults(fn=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import service_config

    directory = service_config().directory
    if args.foreground:
        from .service.client import boot_command

        os.makedirs(directory, mode=0o700, exist_ok=True)
        command = boot_command(directory, detach=False)
        os.execv(command[0], command)  # the service process imports no torch: not this one's interpreter state
    status = _status()
    if args.status or args.stop:
        if status is None:
            raise CliFailure(Exit.NOT_CHECKED, "no checkpoint service is running", path=directory)
        if args.stop:
            os.kill(int(status["pid"]), signal.SIGTERM)
            _wait_gone(int(status["pid"]))
            print(f"stopped the checkpoint service (pid {status['pid']}) of {directory}")
            return Exit.OK
        print(f"pid {status['pid']}  clients {status['clients']}  pending {status['pending']}  "
              f"served {status['served']}  memory-tier images {len(status['memory'])}  dir {directory}")
        return Exit.OK
    if status is None:
        from .service.client import _connect_or_start

        _connect_or_start(directory).close()
        status = _status()
    if status is None:
        raise CliFailure(Exit.NOT_CHECKED, "the checkpoint service did not start (see its service.log)",
                         path=directory)
    print(f"checkpoint service running: pid {status['pid']}, {directory}")
    return Exit.OK


def _status() -> dict[str, Any] | None:
    from .config import service_config
    from .service import wire
    from .service.client import _connect

    try:
        sock = _connect(service_config().directory)
    except OSError:
        return None
    try:
        wire.send(sock, {"op": "status"})
        reply = wire.receive(sock)
    except OSError:
        return None
    finally:
        sock.close()
    return reply[0] if reply is not None and reply[0].get("op") == "status" else None


def _wait_gone(pid: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise CliFailure(Exit.NOT_CHECKED, f"the checkpoint service (pid {pid}) did not exit in {timeout:g} s", path="")
