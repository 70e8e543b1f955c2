"""Saving over an existing checkpoint: the old file's blocks are freed after
the save is durable and reported, and the commit's system calls keep their
order (data fsync -> rename -> directory fsync). Read from strace."""

import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (make installs it)")

_SAVE_TWICE = """
import sys, torch, ckptio
path = sys.argv[1]
ckptio.save({"w": torch.ones(1 << 20)}, path)
print("SECOND", flush=True)
ckptio.save({"w": torch.zeros(1 << 20)}, path)
"""

_CALL = re.compile(r"^(?P<pid>\d+)\s+(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+)")


def _syscalls(tmp_path, code: str) -> list:
    trace = tmp_path / "trace.txt"
    path = tmp_path / "c.pt"
    subprocess.run(
        ["strace", "-f", "-o", str(trace), "-e",
         "trace=openat,fdatasync,fsync,rename,renameat,renameat2,close,unlink,unlinkat,link,linkat",
         sys.executable, "-c", code, str(path)],
        check=True, capture_output=True)
    calls = []
    for line in trace.read_text().splitlines():
        m = _CALL.match(line)
        if m:
            calls.append((m["name"], m["args"], int(m["ret"])))
    return calls, str(path)


def test_replacing_a_checkpoint_frees_the_old_one_after_the_commit(tmp_path):
    calls, path = _syscalls(tmp_path, _SAVE_TWICE)
    # The second save: the O_PATH descriptor of the file it replaces.
    held = [i for i, (name, args, ret) in enumerate(calls)
            if name == "openat" and f'"{path}"' in args and "O_PATH" in args and ret >= 0]
    assert len(held) == 1, "the replaced file is held open across the rename"
    start = held[0]
    old_fd = calls[start][2]
    temp_fd_open = max(i for i, (name, args, _) in enumerate(calls[:start])
                       if name == "openat" and ".ckptio-tmp-" in args)
    temp_fd = calls[temp_fd_open][2]
    data_sync = next(i for i in range(temp_fd_open, start) if calls[i][0] in ("fdatasync", "fsync")
                     and calls[i][1] == str(temp_fd))
    rename = next(i for i in range(start, len(calls)) if calls[i][0].startswith("rename") and f'"{path}"' in calls[i][1])
    dir_sync = next(i for i in range(rename, len(calls)) if calls[i][0] == "fsync")
    close_old = next(i for i in range(start + 1, len(calls)) if calls[i][0] == "close" and calls[i][1] == str(old_fd))
    assert data_sync < start < rename < dir_sync < close_old
    # Never a second name for the checkpoint, never an unlink of it.
    for name, args, _ in calls:
        if name in ("link", "linkat", "unlink", "unlinkat"):
            assert f'"{path}"' not in args
