"""The trainer's side of the service: start it, hand saves over, hear back.

``hand_over(state, payloads, segment, path, ...)`` sends one write request (the staging
segment's descriptor rides along) and returns a ``Handover`` at once: from
then on the checkpoint is the service's to finish, whatever happens to this
process. The save's queued job waits on ``Handover.result()``. If the
service goes away before it answers, ``result()`` raises ``ServiceGone`` and
the job writes the checkpoint itself from the same memory (this process
still maps it): nothing handed over is lost either way.

The first save starts the service, detached (its own session, reparented to
init), with no torch in it: the boot code below makes ``ckptio`` a bare
namespace so that importing ``ckptio.service.server`` runs only the engine's
modules. A dead service's socket is replaced by the next one (it holds the
directory's lock while it lives).
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable

from ..config import service_config
from . import wire
from .segments import SharedSegment
from .server import SOCKET_NAME

if TYPE_CHECKING:
    from ..pickling import PickledState
    from ..results import SaveResult

__all__ = ["ServiceGone", "Handover", "hand_over", "finish_handover", "keep_running", "status", "boot_command",
           "reset_client"]

START_TIMEOUT_S = 10.0   # a service started here has this long to listen (it starts in well under a second)
ANSWER_TIMEOUT_S = 5.0   # a listening service answers hello (and takes a message) within this, or is not used
STOPPED_GRACE_S = 10.0   # a service stopped (SIGSTOP, a debugger) this long is given up on: the trainer writes
AVOID_S = 60.0           # ... and no save tries the service again for this long

_BOOT = """import sys, types
package = types.ModuleType("ckptio")
package.__path__ = [{package_dir!r}]
sys.modules["ckptio"] = package
from ckptio.service.server import main
sys.exit(main(sys.argv[1:]))
"""


class ServiceGone(ConnectionError):
    """The service went away (or refused us) before answering."""


def boot_command(directory: str, *, detach: bool) -> list[str]:
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [sys.executable, "-c", _BOOT.format(package_dir=package_dir), directory] + (["--detach"] if detach else [])


class Handover:
    """A write the service has taken on."""

    def __init__(self, request_id: int, path: str, connection: _Connection) -> None:
        self.id = request_id
        self.path = path
        self._connection = connection
        self._done = threading.Event()
        self._reply: dict[str, Any] | None = None
        self._gone: str | None = None
        self._remote_lock = threading.Lock()
        self._remote: tuple[dict[str, Any] | None] | None = None  # (the "remote" reply, or None: never came)
        self._remote_follower: Callable[[dict[str, Any] | None], object] | None = None

    def _settle(self, reply: dict[str, Any] | None, gone: str | None = None) -> None:
        self._reply, self._gone = reply, gone
        self._done.set()

    @property
    def copying_remotely(self) -> bool:
        """The service wrote the file and queued its remote copy."""
        return self._reply is not None and self._reply.get("ok") is True and self._reply.get("remote") == "queued"

    def follow_remote(self, follower: Callable[[dict[str, Any] | None], object]) -> None:
        """follower(reply) once the service says how the remote copy went
        (``url``, ``seconds``, ``error``, ``skipped``), or follower(None) if
        it went away first: the file is durable, the caller copies it."""
        with self._remote_lock:
            heard, self._remote_follower = self._remote, follower
        if heard is not None:
            follower(heard[0])

    def _remote_settled(self, reply: dict[str, Any] | None) -> None:
        with self._remote_lock:
            self._remote, follower = (reply,), self._remote_follower
        if follower is not None:
            try:
                follower(reply)
            except Exception:  # noqa: BLE001 - a reporting hook must not stop the reply reader
                pass

    def result(self) -> dict[str, Any]:
        """The service's reply (``ok``, ``stats`` or ``error``, ``memory``);
        ServiceGone if it died first, or stayed stopped for STOPPED_GRACE_S:
        a stopped service must not hang the trainer."""
        while not self._done.wait(0.5):
            self._connection.give_up_if_stopped()
        if self._reply is None:
            raise ServiceGone(f"the ckptio service went away before {self.path} was durable: {self._gone}")
        return self._reply


class _Connection:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.sock = _connect_or_start(directory)
        self.lock = threading.Lock()
        self.pending: dict[int, Handover] = {}
        self.copying: dict[int, Handover] = {}  # durable, their remote copy queued in the service
        self.next_id = 1
        self.alive = True
        self.service_pid = 0
        self.stopped_since: float | None = None
        try:
            wire.send(self.sock, {"op": "hello", "pid": os.getpid()}, timeout=ANSWER_TIMEOUT_S)
            if not select.select([self.sock], [], [], ANSWER_TIMEOUT_S)[0]:
                raise TimeoutError(f"no answer in {ANSWER_TIMEOUT_S:g} s")
            hello = wire.receive(self.sock)
        except OSError as e:
            self.sock.close()
            _avoid_for_a_while()
            raise ServiceGone(f"the ckptio service at {directory} does not answer ({e})") from e
        if hello is None or hello[0].get("op") != "hello":
            why = "closed the connection" if hello is None else hello[0].get("error", hello[0].get("op"))
            self.sock.close()
            raise ServiceGone(f"the ckptio service at {directory} refused this process: {why}")
        self.service_pid = int(hello[0].get("pid", 0))
        threading.Thread(target=self._read_replies, name="ckptio-service-replies", daemon=True).start()

    def submit(self, message: dict[str, Any], fds: tuple[int, ...], path: str) -> Handover:
        with self.lock:
            if not self.alive:
                raise ServiceGone("the ckptio service connection is closed")
            handover = Handover(self.next_id, path, self)
            message["id"] = self.next_id
            self.next_id += 1
            self.pending[handover.id] = handover
            try:
                wire.send(self.sock, message, fds, timeout=ANSWER_TIMEOUT_S)
            except OSError as e:
                del self.pending[handover.id]
                self._abandon_locked()
                raise ServiceGone(f"cannot reach the ckptio service: {e}") from e
        return handover

    def give_up_if_stopped(self) -> None:
        """Abandon a service that has been stopped (state T) for STOPPED_GRACE_S:
        its pending writes fail with ServiceGone (their trainers write them)."""
        if _stopped(self.service_pid):
            now = time.monotonic()
            self.stopped_since = self.stopped_since or now
            if now - self.stopped_since >= STOPPED_GRACE_S:
                with self.lock:
                    self._abandon_locked()
                _avoid_for_a_while(self.service_pid)
        else:
            self.stopped_since = None

    def _abandon_locked(self) -> None:
        self.alive = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the reply reader wakes, settles what is pending, and closes
        except OSError:
            pass

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """A one-off question (status), on a connection of its own."""
        sock = _connect(self.directory)
        try:
            wire.send(sock, message)
            reply = wire.receive(sock)
        finally:
            sock.close()
        if reply is None:
            raise ServiceGone("the ckptio service closed the connection")
        return reply[0]

    def _read_replies(self) -> None:
        why = "connection closed"
        try:
            while True:
                received = wire.receive(self.sock)
                if received is None:
                    break
                reply, fds = received
                for fd in fds:
                    os.close(fd)
                rid, op = reply.get("id"), reply.get("op")
                with self.lock:
                    handover = None
                    if op == "done" and isinstance(rid, int):
                        handover = self.pending.pop(rid, None)
                        if handover is not None and reply.get("remote") == "queued":
                            self.copying[rid] = handover
                    elif op == "remote" and isinstance(rid, int):
                        handover = self.copying.pop(rid, None)
                if handover is not None:
                    if op == "done":
                        handover._settle(reply)
                    else:
                        handover._remote_settled(reply)
        except (OSError, wire.WireError) as e:
            why = f"{type(e).__name__}: {e}"
        with self.lock:
            if self.alive is False and self.stopped_since is not None:
                why = f"it has been stopped for {STOPPED_GRACE_S:g} s (pid {self.service_pid})"
            self.alive = False
            stranded, self.pending = list(self.pending.values()), {}
            copying, self.copying = list(self.copying.values()), {}
        for handover in stranded:
            handover._settle(None, why)
        for handover in copying:
            handover._remote_settled(None)
        self.sock.close()


_connection: _Connection | None = None
_connection_lock = threading.Lock()


def _current() -> _Connection:
    global _connection
    with _connection_lock:
        if _connection is None or not _connection.alive:
            if time.monotonic() < _avoid_until or (_avoid_while_stopped and _stopped(_avoid_while_stopped)):
                raise ServiceGone("the ckptio service did not answer lately")
            directory = service_config().directory  # a bad CKPTIO_SERVICE* value is the caller's ConfigError
            try:
                _connection = _Connection(directory)
            except (ServiceGone, OSError):
                _avoid_for_a_while()  # a service that cannot start must not cost every save the wait
                raise
        return _connection


_avoid_until = 0.0        # no save tries the service before this (time.monotonic()) ...
_avoid_while_stopped = 0  # ... nor while this service is stopped


def _avoid_for_a_while(stopped_pid: int = 0) -> None:
    global _avoid_until, _avoid_while_stopped
    _avoid_until, _avoid_while_stopped = time.monotonic() + AVOID_S, stopped_pid


def _stopped(pid: int) -> bool:
    """Whether `pid` is stopped (SIGSTOP, a tracer): it runs no code until continued."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def hand_over(state: PickledState, payloads: list[tuple[int, int]], segment: object, path: str, alignment: int, *,
              after: dict[str, Any] | None = None, memory: dict[str, Any] | None = None,
              remote: dict[str, Any] | None = None) -> Handover | None:
    """Give the service the write to `path` of a checkpoint staged in
    `segment` (its records: `state`'s, with the storages at `payloads`);
    None when it cannot take it (not a shared segment, or no service: the
    caller writes itself). `after`, `memory`, `remote`: what the service
    does once the file is durable (see ckptio.background.NativeWrite)."""
    if segment is not None and not isinstance(segment, SharedSegment):
        return None  # staged in private memory (allocated before the service was wanted)
    base = segment.address if segment is not None else 0
    # File order: the small records (the pickle, ...), then every storage as
    # one packed run (offsets and sizes in the segment), then the tail.
    records: list[Any] = [[name, "bytes", wire.encode_bytes(bytes(data))] for name, data in state.head]
    offsets = [a - base if n else 0 for a, n in payloads]  # an empty storage has no address to speak of
    records.append([f"{state.prefix}/data/", "run", wire.encode_ints(offsets),
                    wire.encode_ints([n for _, n in payloads])])
    records += [[name, "bytes", wire.encode_bytes(bytes(data))] for name, data in state.tail]
    message: dict[str, Any] = {"op": "write", "path": os.path.abspath(path), "alignment": alignment,
                               "records": records, "after": after, "memory": memory, "remote": remote}
    try:
        return _current().submit(message, (segment.fd,) if segment is not None else (), path)
    except (ServiceGone, OSError) as e:
        _warn_once(f"ckptio: the checkpoint service is not available ({e}); saving in this process")
        return None


def finish_handover(handover: Handover) -> SaveResult | None:
    """The handed-over write's result once durable; None if the service died
    first (the caller then writes it itself); raises the write's error."""
    from ..errors import CheckpointIOError
    from ..results import SaveResult

    try:
        reply = handover.result()
    except ServiceGone as e:
        _warn_once(f"ckptio: {e}; writing it in this process")
        return None
    if not reply.get("ok"):
        code = reply.get("errno")
        raise CheckpointIOError(code if isinstance(code, int) else 5, f"the ckptio service could not write it: "
                                f"{reply.get('error')}", handover.path)
    memory = reply.get("memory")
    if isinstance(memory, dict) and "error" in memory:
        warnings.warn(f"ckptio: {handover.path} is durable but not kept in the memory tier: {memory['error']}",
                      RuntimeWarning, stacklevel=2)
    return SaveResult.from_stats(reply["stats"])


def keep_running() -> bool:
    """Connect to the service (starting it if need be), so that it runs,
    and looks after its memory tier, while this process lives; False (and a
    warning, once) if it cannot."""
    try:
        _current()
        return True
    except (ServiceGone, OSError) as e:
        _warn_once(f"ckptio: the checkpoint service is not available ({e}); the memory tier is written without it")
        return False


def status() -> dict[str, Any]:
    """The running service's status (ServiceGone if none runs)."""
    return _current().request({"op": "status"})


def _connect(directory: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(os.path.join(directory, SOCKET_NAME))
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_or_start(directory: str) -> socket.socket:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        return _connect(directory)
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    started = subprocess.run(boot_command(directory, detach=True), check=False, stdin=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True, timeout=START_TIMEOUT_S)
    if started.returncode != 0:  # it failed before detaching (e.g. its imports): no point waiting
        last = started.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ServiceGone(f"the ckptio service could not start (exit {started.returncode}: {last[0]})")
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            return _connect(directory)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if time.monotonic() > deadline:
                raise ServiceGone(f"the ckptio service did not start in {START_TIMEOUT_S:g} s "
                                  f"(see {os.path.join(directory, 'service.log')})") from e
            time.sleep(0.02)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    key = message.split("(")[0]
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def reset_client() -> None:
    """Close the connection (saves still waiting on it are written here);
    the next save connects again. Tests use this as a trainer's exit."""
    global _connection, _avoid_until, _avoid_while_stopped
    with _connection_lock:
        connection, _connection = _connection, None
        _avoid_until, _avoid_while_stopped = 0.0, 0
        _warned.clear()
    if connection is not None:
        try:
            connection.sock.shutdown(socket.SHUT_RDWR)  # wakes the reply reader, which closes it
        except OSError:
            pass


def _forget_after_fork() -> None:
    # The child shares the parent's socket: close its copy, never shut the parent's down.
    global _connection, _connection_lock
    if _connection is not None:
        try:
            os.close(_connection.sock.detach())
        except OSError:
            pass
    _connection = None
    _connection_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
