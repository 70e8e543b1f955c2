"""``ckptio serve``: the per-node, per-user writer process that outlives trainers.

It imports the engine and the standard library, never torch. Trainers of
the same uid connect over a Unix socket in the service directory (0700;
peer credentials checked too), hand over write requests naming a shared
segment (its descriptor comes with the message) and its records, and get
back "durable" (or the error). Once a request is received, the checkpoint is
the service's to finish: a trainer that dies after handing it over loses
nothing. Requests are written one at a time, taken round-robin from the
clients that have any (one trainer cannot starve another), with the same
engine and commit protocol as in-process saves; then the manager's
``latest`` pointer and pruning, then the memory-tier image (see
ckptio.service.memory_tier).

One service per directory: it holds ``service.lock`` (flock) for its
lifetime. It exits once nothing is connected and nothing is pending for
CKPTIO_SERVICE_IDLE_S, or, while it keeps memory-tier images, for
CKPTIO_MEMORY_KEEP_S (and then removes them).
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .._engine import get_engine
from .._paths import committed_file, fsync_directory, remove_stale_temporaries
from ..config import service_config
from . import memory_tier, wire
from .segments import map_segment

__all__ = ["main", "SOCKET_NAME", "LOCK_NAME", "LOG_NAME"]

SOCKET_NAME, LOCK_NAME, LOG_NAME = "service.sock", "service.lock", "service.log"
PROTOCOL = 1
MAX_SEGMENTS_PER_CLIENT = 16  # CKPTIO_STAGING_SLOTS' largest value


@dataclass
class _Job:
    client: _Client
    request: dict[str, Any]
    mapping: Any  # the segment's mmap (or None: every record inline)
    base: int


@dataclass
class _Client:
    sock: socket.socket
    pid: int
    jobs: collections.deque[_Job] = field(default_factory=collections.deque)
    # Its segments, mapped once: (dev, inode) -> (mapping, base), the most recent last. Queued jobs hold
    # their own reference, so forgetting one here (a slot regrown, the trainer gone) frees its RAM after them.
    segments: collections.OrderedDict[tuple[int, int], tuple[Any, int]] = field(
        default_factory=collections.OrderedDict)
    alive: bool = True
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def reply(self, message: dict[str, Any]) -> None:
        if not self.alive:
            return
        try:
            with self.send_lock:
                wire.send(self.sock, message)
        except OSError:
            self.alive = False  # the trainer died: its checkpoint is still finished


class Service:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.config = service_config()
        self.clients: list[_Client] = []
        self.cond = threading.Condition()
        self.pending = 0
        self.last_activity = time.monotonic()
        self.stopping = False
        self.orphans: list[_Client] = []  # gone, with writes still to finish
        self.served = 0
        self.remote_tiers: dict[tuple[str, ...], Any] = {}  # RemoteTiers by (prefix, pruning, waiting, fsspec options)

    # --- connections ---------------------------------------------------------

    def accept_forever(self, listener: socket.socket) -> None:
        while not self.stopping:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                               struct.calcsize("3i")))
            if uid != os.getuid():
                try:
                    wire.send(sock, {"op": "refused", "error": f"uid {uid} is not this service's ({os.getuid()})"})
                finally:
                    sock.close()
                log(f"refused pid {pid} of uid {uid}")
                continue
            client = _Client(sock, pid)
            with self.cond:
                self.clients.append(client)
                self.last_activity = time.monotonic()
            threading.Thread(target=self.serve_client, args=(client,), daemon=True).start()

    def serve_client(self, client: _Client) -> None:
        try:
            while True:
                try:
                    received = wire.receive(client.sock)
                except wire.BadMessage as e:
                    client.reply({"op": "error", "error": str(e)})
                    continue
                if received is None:
                    break
                message, fds = received
                try:
                    self.handle(client, message, fds)
                except wire.WireError as e:
                    client.reply({"op": "error", "error": str(e)})
                finally:
                    for fd in fds:
                        os.close(fd)
        except (OSError, wire.WireError):
            pass
        finally:
            client.alive = False
            client.segments.clear()  # its queued jobs keep what they still need
            with self.cond:
                self.clients.remove(client)
                if client.jobs:
                    self.orphans.append(client)  # its checkpoints are finished all the same
                self.last_activity = time.monotonic()
                self.cond.notify_all()
            client.sock.close()

    def handle(self, client: _Client, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if op == "hello":
            client.reply({"op": "hello", "pid": os.getpid(), "protocol": PROTOCOL})
        elif op == "status":
            with self.cond:
                status = {"op": "status", "pid": os.getpid(), "clients": len(self.clients) - 1,  # not the asker
                          "pending": self.pending,
                          "served": self.served, "memory": [p for _, _, p, _ in
                                                            memory_tier.node_usage(self.directory)]}
            client.reply(status)
        elif op == "write":
            _check_write(message)
            mapping, base = self.segment(client, fds[0]) if fds else (None, 0)
            job = _Job(client, message, mapping, base)
            with self.cond:
                client.jobs.append(job)
                self.pending += 1
                self.last_activity = time.monotonic()
                self.cond.notify_all()
        else:
            raise wire.WireError(f"unknown op {op!r}")

    def segment(self, client: _Client, fd: int) -> tuple[Any, int]:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        known = client.segments.pop(key, None)
        if known is None or len(known[0]) != st.st_size:
            known = map_segment(fd)
        client.segments[key] = known
        while len(client.segments) > MAX_SEGMENTS_PER_CLIENT:  # staging slots that were regrown or let go
            client.segments.popitem(last=False)
        return known

    # --- the write lane ------------------------------------------------------

    def write_forever(self) -> None:
        turn = 0
        while True:
            with self.cond:
                while not self.clients_with_jobs():
                    if self.stopping:
                        return
                    self.cond.wait(0.5)
                holders = self.clients_with_jobs()
                client = holders[turn % len(holders)]  # round-robin: no trainer waits behind another's backlog
                turn += 1
                job = client.jobs.popleft()
                if not client.jobs and client in self.orphans:
                    self.orphans.remove(client)
            try:
                reply = self.write(job)
                client.reply(reply)
                if reply.get("remote") == "queued":  # after "done": the trainer hears of its copy after its file
                    self.copy_remotely(job)
            finally:
                with self.cond:
                    self.pending -= 1
                    self.served += 1
                    self.last_activity = time.monotonic()
                    self.cond.notify_all()

    def clients_with_jobs(self) -> list[_Client]:
        return [c for c in self.clients + self.orphans if c.jobs]

    def write(self, job: _Job) -> dict[str, Any]:
        request = job.request
        path = request["path"]
        reply: dict[str, Any] = {"op": "done", "id": request["id"]}
        try:
            records = _records(request["records"], job.mapping, job.base)
            remove_stale_temporaries(os.path.dirname(path))
            ticket = get_engine().save(path, records, int(request["alignment"]), job.mapping)
            ticket.wait()
            ticket.check()
            reply["stats"] = ticket.stats()
            after = request.get("after") or {}
            if after.get("pointer"):
                _move_pointer(after["pointer"])
            if after.get("prune"):
                _prune(after["prune"])
        except Exception as e:  # noqa: BLE001 - reported to the trainer, which owns the error
            reply.update(ok=False, error=f"{type(e).__name__}: {e}", errno=getattr(e, "errno", None) or 5)
            log(f"write of {path} failed: {type(e).__name__}: {e}")
            return reply
        reply["ok"] = True
        if request.get("remote"):
            reply["remote"] = "queued"
        memory = request.get("memory")
        if memory:
            write = memory_tier.engine_writer(records, int(request["alignment"]), job.mapping)
            reply["memory"] = memory_tier.store(self.directory, self.config.memory_bytes, memory,
                                                reply["stats"]["bytes"], write)
        return reply

    # --- the remote lanes ----------------------------------------------------

    def copy_remotely(self, job: _Job) -> None:
        """Queue the written file's copy in its remote tier's lane (one per
        prefix, threads of its own: a slow network never delays a local
        write); the trainer hears how it went, if it is still there."""
        spec, path, client, rid = job.request["remote"], job.request["path"], job.client, job.request["id"]

        def settled(copy: Any) -> None:
            error = copy.error
            client.reply({"op": "remote", "id": rid, "url": copy.url, "seconds": copy.seconds,
                          "error": None if error is None else f"{type(error).__name__}: {error}",
                          "skipped": type(error).__name__ == "CopySkipped"})
            with self.cond:
                self.last_activity = time.monotonic()
        try:
            tier = self.remote_tier(spec)
        except Exception as e:  # noqa: BLE001 - a bad tier fails the copy, never the service
            client.reply({"op": "remote", "id": rid, "url": str(spec.get("prefix")), "seconds": 0.0,
                          "error": f"{type(e).__name__}: {e}", "skipped": False})
            return
        tier.lane.submit(str(spec["name"]), path, settled)

    def remote_tier(self, spec: dict[str, Any]) -> Any:
        from ..remote_tier import RemoteTier

        fields = ("prefix", "pattern", "keep", "waiting", "options")
        key = tuple(json.dumps(spec.get(k), sort_keys=True) for k in fields)
        with self.cond:
            tier = self.remote_tiers.get(key)
            if tier is None:
                tier = self.remote_tiers[key] = RemoteTier.from_service_spec(spec)
            return tier

    def remote_pending(self) -> list[str]:
        with self.cond:
            tiers = list(self.remote_tiers.values())
        return [work for tier in tiers for work in tier.pending()]

    # --- lifetime ------------------------------------------------------------

    def idle_for(self) -> float:
        if self.remote_pending():
            return 0.0
        with self.cond:
            if self.clients or self.pending:
                return 0.0
            return time.monotonic() - self.last_activity


def _records(spec: Any, mapping: Any, base: int) -> list[tuple[str, Any]]:
    """The engine's records from a write request's: ``[name, "bytes", b64]``
    (inline), or ``[prefix, "run", offsets, sizes]`` (storages prefix0,
    prefix1, ... in the segment), each checked to lie inside it."""
    size = 0 if mapping is None else len(mapping)
    records: list[tuple[str, Any]] = []
    for entry in spec:
        if not isinstance(entry, list) or len(entry) not in (3, 4) or not isinstance(entry[0], str):
            raise wire.BadMessage(f"bad record {entry!r:.80}")
        if entry[1] == "bytes" and len(entry) == 3:
            records.append((entry[0], wire.decode_bytes(entry[2])))
        elif entry[1] == "run" and len(entry) == 4:
            offsets, sizes = wire.decode_ints(entry[2]), wire.decode_ints(entry[3])
            if len(offsets) != len(sizes):
                raise wire.BadMessage("a run needs as many offsets as sizes")
            for i, (offset, n) in enumerate(zip(offsets, sizes)):
                if offset < 0 or n < 0 or offset + n > size:
                    raise wire.BadMessage(f"record {entry[0]}{i} lies outside the segment ({size} bytes)")
                records.append((f"{entry[0]}{i}", (base + offset, n) if n else b""))
        else:
            raise wire.BadMessage(f"bad record kind {entry[1]!r:.20}")
    return records


def _check_write(message: dict[str, Any]) -> None:
    if not isinstance(message.get("id"), int) or not isinstance(message.get("path"), str) \
            or not os.path.isabs(message["path"]) or not isinstance(message.get("records"), list) \
            or not isinstance(message.get("alignment"), int):
        raise wire.WireError("a write needs an int id, an absolute path, records and an alignment")


def _move_pointer(spec: dict[str, Any]) -> None:
    """A CheckpointManager's ``latest``, after a commit: forward only (a write
    finished late, after its trainer gave up on this service, must not move it
    back past a newer step)."""
    path = os.path.join(spec["directory"], "latest")
    try:
        with open(path) as f:
            current = re.match(spec["pattern"], f.read().strip())
    except OSError:
        current = None
    if current is not None and int(current.group(1)) > int(spec["step"]):
        return
    with committed_file(path, "w", site="pointer") as f:
        f.write(spec["name"] + "\n")


def _prune(spec: dict[str, Any]) -> None:
    """A CheckpointManager's keep_last, after a commit: never the step just written."""
    directory, pattern = spec["directory"], re.compile(spec["pattern"])
    steps = sorted(int(m.group(1)) for m in map(pattern.match, os.listdir(directory)) if m)
    for old in steps[: -int(spec["keep_last"])]:
        if old != spec["step"]:
            try:
                os.remove(os.path.join(directory, f"{spec['prefix']}{old}{spec['suffix']}"))
            except FileNotFoundError:
                pass


def log(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ckptio service {os.getpid()}: {text}", file=sys.stderr, flush=True)


def run(directory: str) -> int:
    """Serve until idle; 0 when done (or when another service holds the directory)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    lock_fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another service serves {directory}")
        return 0
    service = Service(directory)
    path = os.path.join(directory, SOCKET_NAME)
    if os.path.exists(path):
        os.remove(path)  # a dead service's: we hold the lock
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    fsync_directory(directory)
    log(f"serving {directory}")
    signal.signal(signal.SIGTERM, lambda *_: setattr(service, "stopping", True))
    threading.Thread(target=service.accept_forever, args=(listener,), daemon=True).start()
    writer = threading.Thread(target=service.write_forever, daemon=True)
    writer.start()
    cfg = service.config
    while not service.stopping:
        time.sleep(0.1)
        keeping = bool(memory_tier.node_usage(directory))
        if service.idle_for() > (cfg.keep_s if keeping else cfg.idle_s):
            break
    os.remove(path)  # new trainers start a new service from here on
    listener.close()
    service.stopping = True
    with service.cond:
        service.cond.notify_all()
    writer.join()  # pending writes finish first, whatever ended the wait
    _finish_remote_copies(service)
    _remove_memory_tier(directory)  # idle past CKPTIO_MEMORY_KEEP_S, or told to stop: the RAM goes back
    log(f"exiting after {service.served} write(s)")
    return 0


def _finish_remote_copies(service: Service) -> None:
    """Remote copies still running or waiting get one copy's deadline
    (CKPTIO_REMOTE_COPY_TIMEOUT_S), as at a trainer's exit."""
    if not service.remote_pending():
        return
    from ..config import remote_copy_config

    deadline = time.monotonic() + remote_copy_config().copy_timeout_s
    for tier in list(service.remote_tiers.values()):
        left = tier.wait(max(0.0, deadline - time.monotonic()))
        if left:
            log(f"exiting with remote work not done: {'; '.join(left)}")


def _remove_memory_tier(directory: str) -> None:
    import shutil

    shutil.rmtree(os.path.join(directory, "memory"), ignore_errors=True)


def main(argv: list[str]) -> int:
    """``<boot> <directory> [--detach]``: see ckptio.service.client.spawn."""
    directory = argv[0]
    if "--detach" in argv[1:]:
        if os.fork() > 0:
            return 0  # the spawner reaps this intermediate at once; the service is reparented
        os.setsid()
        log_fd = os.open(os.path.join(directory, LOG_NAME), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
    return run(directory)
