"""The service's wire format: JSON messages, length-prefixed, over a Unix socket.

A message is a 4-byte big-endian length and that many bytes of UTF-8 JSON
(an object). File descriptors (the shared segments) ride along as
SCM_RIGHTS ancillary data of the message's first bytes. Nothing is ever
unpickled: a hostile peer can at worst get an error back. Bytes (the small
records of a checkpoint: its pickle, version, byte order) travel as base64.
"""

from __future__ import annotations

import array
import base64
import json
import select
import socket
import struct
import sys
import time
from typing import Any

__all__ = ["MAX_MESSAGE_BYTES", "MAX_FDS", "WireError", "BadMessage", "send", "receive", "encode_bytes", "decode_bytes",
           "encode_ints", "decode_ints"]

MAX_MESSAGE_BYTES = 256 << 20  # a 200,000-tensor checkpoint's pickle, base64, fits
MAX_FDS = 4
_LENGTH = struct.Struct(">I")


class WireError(ConnectionError):
    """The peer sent something that is not a message, or went away mid-message."""


class BadMessage(WireError):
    """A whole frame that is not a JSON object: the stream is still in step."""


def send(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = (),
         timeout: float | None = None) -> None:
    """Send one message; with `timeout`, raise TimeoutError rather than wait
    longer for the peer to make room (a stopped peer never reads)."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(data)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    frame = memoryview(_LENGTH.pack(len(data)) + data)
    deadline = None if timeout is None else time.monotonic() + timeout
    while frame:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [sock], [], left)[1]:
                raise TimeoutError(f"the peer took no message bytes for {timeout:g} s")
        try:
            if fds:  # the descriptors go with the first bytes
                sent = socket.send_fds(sock, [frame], list(fds), socket.MSG_DONTWAIT)
                fds = ()
            else:
                sent = sock.send(frame, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        frame = frame[sent:]


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and the descriptors that came with it; None at a
    clean end of stream (the peer closed between messages)."""
    head, fds, _, _ = socket.recv_fds(sock, _LENGTH.size, MAX_FDS)
    try:
        if not head:
            return None
        while len(head) < _LENGTH.size:
            more = sock.recv(_LENGTH.size - len(head))
            if not more:
                raise WireError("the peer went away mid-message")
            head += more
        (length,) = _LENGTH.unpack(head)
        if length > MAX_MESSAGE_BYTES:
            raise WireError(f"message of {length} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
        body = _receive_exactly(sock, length)
        try:
            message = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadMessage(f"not a JSON message: {e}") from None
        if not isinstance(message, dict):
            raise BadMessage("a message must be a JSON object")
        return message, fds
    except BaseException:
        for fd in fds:
            _close_quietly(fd)
        raise


def _receive_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise WireError("the peer went away mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_bytes(text: Any) -> bytes:
    if not isinstance(text, str):
        raise WireError("bytes must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:
        raise WireError(f"bad base64: {e}") from None


def encode_ints(values: list[int]) -> str:
    """Many offsets or sizes at once: little-endian int64s, base64."""
    return encode_bytes(array.array("q", values).tobytes() if sys.byteorder == "little"
                        else _swapped(array.array("q", values)).tobytes())


def decode_ints(text: Any) -> list[int]:
    data = decode_bytes(text)
    if len(data) % 8:
        raise BadMessage("a packed int64 list must be a multiple of 8 bytes")
    values = array.array("q")
    values.frombytes(data)
    return (values if sys.byteorder == "little" else _swapped(values)).tolist()


def _swapped(values: array.array[int]) -> array.array[int]:
    values.byteswap()
    return values


def _close_quietly(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
