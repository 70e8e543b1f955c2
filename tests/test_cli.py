"""The `ckptio` command on real files: output, and exit codes on intact,
damaged and bad inputs.

The exit codes (ckptio.cli_outcome): 0 ok, 1 damaged, 2 not checked / bad
input, 3 bad setting, 4 unsafe, 5 unsupported. On any bad input a command
prints exactly one line to stderr and no traceback."""

import argparse
import collections
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import ckptio

try:
    import torch.distributed.checkpoint as dcp

    from ckptio.distributed import StorageWriter
except ImportError:  # torch 2.7 on Python 3.9 needs importlib_metadata, which a base install lacks
    dcp = StorageWriter = None
needs_dcp = pytest.mark.skipif(dcp is None, reason="torch.distributed.checkpoint does not import here")
HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None

OK, DAMAGED, NOT_CHECKED, BAD_SETTING, UNSAFE, UNSUPPORTED = 0, 1, 2, 3, 4, 5
SCRIPT = os.path.join(os.path.dirname(sys.executable), "ckptio")
# No credentials for any object store: `list --remote s3://...` fails at once, the same way everywhere.
NO_CLOUD = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true"}


def _env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CKPTIO_"))}
    env.update(NO_CLOUD)
    env.update(extra or {})
    return env


def run(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "ckptio", *args], capture_output=True, text=True, timeout=600,
                          env=_env(env), cwd=cwd)


def run_script(*args, env=None, cwd=None):
    """The installed console script, as a user runs it."""
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=600, env=_env(env), cwd=cwd)


def _flip_payload_byte(src, dst, record="data/0"):
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/" + record))
    n = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little")
    m = int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
    data[info.header_offset + 30 + n + m + 5] ^= 0x40
    dst.write_bytes(bytes(data))


@pytest.fixture
def files(tmp_path):
    ours = tmp_path / "ours.pt"
    ckptio.save({"w": torch.randn(64, 8), "b": torch.ones(3, dtype=torch.bfloat16), "step": 4}, ours)
    theirs = tmp_path / "theirs.pt"
    torch.save({"x": torch.arange(10)}, theirs)
    damaged = tmp_path / "damaged.pt"
    _flip_payload_byte(ours, damaged)
    return ours, theirs, damaged


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Every kind of bad input, made once: {name: path}."""
    d = tmp_path_factory.mktemp("bad")
    p = {name: d / name for name in (
        "good.pt", "legacy.pt", "missing.pt", "dir", "trunc.pt", "flip.pt", "random.bin", "x80", "empty.pt",
        "unsafe.pt", "legacy_unsafe.pt", "legacy_trunc.pt", "plain.zip", "missing.safetensors", "bad.safetensors",
        "dcp", "dcp_flip", "dcp_no_rank_file", "dcp_bad_metadata", "dcp_unsafe", "distcp_only", "nodir",
        "empty_dir", "damaged_only", "script.pt", "dcp_evil_metadata")}
    ckptio.save({"w": torch.randn(16, 4), "step": 3}, p["good.pt"])
    torch.save({"x": torch.arange(5)}, p["legacy.pt"], _use_new_zipfile_serialization=False)
    p["dir"].mkdir()
    p["empty_dir"].mkdir()
    good = p["good.pt"].read_bytes()
    p["trunc.pt"].write_bytes(good[: len(good) // 2])
    _flip_payload_byte(p["good.pt"], p["flip.pt"])
    p["random.bin"].write_bytes(random.Random(25).randbytes(4096))
    p["x80"].write_bytes(b"\x80")
    p["empty.pt"].write_bytes(b"")
    # argparse.Namespace is outside torch's weights-only allowlist.
    torch.save({"t": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, p["unsafe.pt"])
    torch.save({"args": argparse.Namespace(lr=0.1)}, p["legacy_unsafe.pt"], _use_new_zipfile_serialization=False)
    p["legacy_trunc.pt"].write_bytes(p["legacy.pt"].read_bytes()[:-40])
    with zipfile.ZipFile(p["plain.zip"], "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(p["script.pt"]))
    p["bad.safetensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    p["damaged_only"].mkdir()
    shutil.copy(p["flip.pt"], p["damaged_only"] / "step_5.pt")
    if dcp is not None:  # else the DCP cases are left out (see _check_cases)
        _make_dcp_inputs(p)
    return {name: str(path) for name, path in p.items()}


def _make_dcp_inputs(p):
    state = {"w": torch.randn(8, 8), "b": torch.ones(3), "step": 7}
    dcp.save(state, storage_writer=StorageWriter(p["dcp"]), no_dist=True)
    for name in ("dcp_flip", "dcp_no_rank_file", "dcp_bad_metadata", "distcp_only"):
        shutil.copytree(p["dcp"], p[name])
    rank_file = p["dcp_flip"] / "__0_0.distcp"
    data = bytearray(rank_file.read_bytes())
    data[4096 + 10] ^= 1  # inside the first item's pickle
    rank_file.write_bytes(bytes(data))
    (p["dcp_no_rank_file"] / "__0_0.distcp").unlink()
    (p["dcp_bad_metadata"] / ".metadata").write_bytes(b"\x80\x02garbage")
    (p["distcp_only"] / ".metadata").unlink()
    shutil.copytree(p["dcp"], p["dcp_evil_metadata"])
    (p["dcp_evil_metadata"] / ".metadata").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")  # never run
    dcp.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, storage_writer=StorageWriter(p["dcp_unsafe"]),
             no_dist=True)


def _settings(code=BAD_SETTING):
    return [({"CKPTIO_BLOCK_MB": "abc"}, code), ({"CKPTIO_NUM_THREADS": "0"}, code)]


def _file_cases(bad, command, extra=()):
    """(argv, env, expected code) of the bad inputs that inspect and verify share."""
    b = bad
    cases = [
        ([b["missing.pt"]], None, NOT_CHECKED),
        ([b["dir"]], None, NOT_CHECKED),
        ([b["trunc.pt"]], None, DAMAGED),
        ([b["flip.pt"]], None, DAMAGED),
        ([b["random.bin"]], None, NOT_CHECKED),
        ([b["x80"]], None, NOT_CHECKED),
        ([b["empty.pt"]], None, NOT_CHECKED),
        ([b["unsafe.pt"]], None, UNSAFE),
        ([b["legacy_unsafe.pt"]], None, UNSAFE),
        ([b["legacy_trunc.pt"]], None, NOT_CHECKED),
        ([b["plain.zip"]], None, NOT_CHECKED),
        ([b["script.pt"]], None, UNSUPPORTED),  # TorchScript: compressed records, yet not damaged
        ([b["missing.safetensors"]], None, NOT_CHECKED),
        ([b["dcp_flip"]], None, DAMAGED),
        ([b["dcp_no_rank_file"]], None, DAMAGED),
        ([b["dcp_bad_metadata"]], None, DAMAGED),
        ([b["dcp_unsafe"]], None, UNSAFE),
        ([b["dcp_evil_metadata"]], None, UNSAFE),
        ([b["distcp_only"]], None, NOT_CHECKED),
        ([b["good.pt"]], {"CKPTIO_BLOCK_MB": "abc"}, BAD_SETTING),
        ([b["dcp"]], {"CKPTIO_NUM_THREADS": "0"}, BAD_SETTING),
        ([], None, NOT_CHECKED),  # no path: a usage error
        *extra,
    ]
    return _here([([command, *argv], env, code) for argv, env, code in cases])


# Runs many command lines quickly: imports ckptio (and torch, ~2 s) once, then
# forks a fresh child per command line, which sets its environment and argv
# and runs the CLI's main() exactly as `python -m ckptio` does, its stdout and
# stderr in files. Same code, same exit codes, same output; the console script
# itself is run by test_console_script_*.
FORKING_RUNNER = r"""
import json, os, sys, tempfile
hide, cases = json.load(sys.stdin)
sys.modules.update(dict.fromkeys(hide, None))  # as if not installed
import ckptio.cli
results = []
for argv, env in cases:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            os.environ.update(env or {})
            sys.argv = ["ckptio", *argv]
            try:
                code = ckptio.cli.main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        results.append([os.waitstatus_to_exitcode(status), out.read().decode(errors="replace"),
                        err.read().decode(errors="replace")])
json.dump(results, sys.__stdout__)
"""


def run_many(cases, hide=()):
    """[(argv, env)] -> [CompletedProcess-like results], one forked child each
    (FORKING_RUNNER), in order; `hide`: modules made unimportable."""
    proc = subprocess.run([sys.executable, "-c", FORKING_RUNNER], input=json.dumps([list(hide), cases]),
                          capture_output=True,
                          text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr
    return [subprocess.CompletedProcess([], code, out, err) for code, out, err in json.loads(proc.stdout)]


def _here(cases):
    """The cases this install can run: without DCP, those on DCP directories are left out."""
    if dcp is not None:
        return cases
    return [c for c in cases if not any(os.path.basename(str(a)).startswith("dcp") for a in c[0])]


def _check_cases(cases, runner=None):
    """Run every case and check each ends in its code, exactly one stderr
    line and no traceback. Returns the results."""
    if runner is None:
        results = run_many([(argv, env) for argv, env, _ in cases])
    else:
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(lambda case: runner(*case[0], env=case[1]), cases))
    failures = []
    for (argv, env, code), out in zip(cases, results):
        lines = out.stderr.strip().splitlines()
        problems = []
        if out.returncode != code:
            problems.append(f"exit {out.returncode}, expected {code}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines")
        if "Traceback" in out.stderr + out.stdout:
            problems.append("a traceback")
        if code != DAMAGED and "DAMAGED" in out.stdout:
            problems.append("DAMAGED for what is not damage")
        if problems:
            failures.append(f"ckptio {' '.join(argv)} (env {env}): {', '.join(problems)}\n"
                            f"  stderr: {out.stderr.strip()!r}\n  stdout tail: {out.stdout[-300:]!r}")
    assert not failures, "\n".join(failures)
    return results


# --- exit codes on bad inputs: every subcommand ------------------------------------

def test_inspect_bad_inputs(bad):
    cases = _file_cases(bad, "inspect", extra=[(["s3://nobucket/step_1.pt"], None, UNSUPPORTED)])
    assert len(cases) >= 12
    results = _check_cases(cases)
    for (argv, _, _), out in zip(cases, results):
        line = out.stderr.strip()
        if len(argv) > 1:  # the path is named once, not twice
            assert line.count(argv[1]) == 1, line
        assert "central directory" not in line and " 1 bytes" not in line and "\x1b[" not in line + out.stdout
        assert "[Errno" not in line and not re.search(r"(\b[\w ]{6,}) \[\1\]", line), line  # errno text once


def test_verify_bad_inputs_and_never_damaged_for_what_is_not_damage(bad):
    # Not damage, each of them: a missing file, a directory, a valid legacy
    # file (loads fine, holds no checksums), a healthy checkpoint under a bad
    # setting, not a checkpoint at all.
    not_damage = [([bad["legacy.pt"]], None, NOT_CHECKED),
                  ([bad["good.pt"], bad["legacy.pt"]], None, NOT_CHECKED),
                  (["s3://nobucket/step_1.pt"], None, NOT_CHECKED)]
    cases = _file_cases(bad, "verify", extra=not_damage)
    results = _check_cases(cases)
    for (argv, _, code), out in zip(cases, results):
        words = [line.split()[0] for line in out.stdout.splitlines()]
        assert ("DAMAGED" in words) == (code == DAMAGED), (argv, out.stdout)


def test_convert_bad_inputs(bad, tmp_path):
    b, dst = bad, str(tmp_path / "out.pt")
    cases = [
        (["convert", b["missing.pt"], dst], None, NOT_CHECKED),
        (["convert", b["dir"], dst], None, NOT_CHECKED),
        (["convert", b["trunc.pt"], dst], None, DAMAGED),
        (["convert", b["flip.pt"], dst], None, DAMAGED),
        (["convert", b["random.bin"], dst], None, NOT_CHECKED),
        (["convert", b["x80"], dst], None, NOT_CHECKED),
        (["convert", b["empty.pt"], dst], None, NOT_CHECKED),
        (["convert", b["unsafe.pt"], dst], None, UNSAFE),
        (["convert", b["legacy_trunc.pt"], dst], None, NOT_CHECKED),
        (["convert", b["plain.zip"], dst], None, NOT_CHECKED),
        (["convert", b["script.pt"], dst], None, UNSUPPORTED),
        (["convert", b["missing.safetensors"], dst], None, NOT_CHECKED),
        (["convert", b["bad.safetensors"], dst], None, NOT_CHECKED if HAS_SAFETENSORS else UNSUPPORTED),
        (["convert", b["good.pt"], os.path.join(b["nodir"], "out.pt")], None, NOT_CHECKED),
        (["convert", b["good.pt"], b["dir"]], None, NOT_CHECKED),
        (["convert", b["good.pt"], str(tmp_path / "out.safetensors")], None, UNSUPPORTED),  # "step" is an int
        (["convert", b["dcp"], dst], None, UNSUPPORTED),
        (["convert", b["good.pt"], dst], {"CKPTIO_BLOCK_MB": "abc"}, BAD_SETTING),
        (["convert", b["good.pt"]], None, NOT_CHECKED),
    ]
    cases = _here(cases)
    results = _check_cases(cases)
    assert not os.path.exists(dst) and not os.path.exists(tmp_path / "out.safetensors")
    by_argv = {tuple(argv[1:]): out.stderr for (argv, _, _), out in zip(cases, results)}
    unsafe = by_argv[(b["unsafe.pt"], dst)]
    assert "argparse.Namespace" in unsafe and "--unsafe" in unsafe
    assert "--tensors-only" in by_argv[(b["good.pt"], str(tmp_path / "out.safetensors"))]
    nodir = by_argv[(b["good.pt"], os.path.join(b["nodir"], "out.pt"))]
    assert "nodir" in nodir and "does not exist" in nodir
    assert "TorchScript" in by_argv[(b["script.pt"], dst)]


def test_list_bad_inputs(bad):
    b = bad
    cases = [
        (["list", b["nodir"]], None, NOT_CHECKED),
        (["list", b["good.pt"]], None, NOT_CHECKED),
        (["list", b["x80"]], None, NOT_CHECKED),
        (["list", b["empty_dir"]], None, NOT_CHECKED),  # no checkpoints at all
        (["list", b["damaged_only"]], None, DAMAGED),
        (["list", b["empty_dir"], "--remote", "/tmp/x"], None, NOT_CHECKED),
        (["list", b["empty_dir"], "--remote", "relative/dir"], None, NOT_CHECKED),
        (["list", b["empty_dir"], "--remote", "s3://nobucket"], None, NOT_CHECKED),
        (["list", b["empty_dir"], "--remote", "nosuchprotocol://x"], None, NOT_CHECKED),
        (["list", b["damaged_only"]], {"CKPTIO_BLOCK_MB": "abc"}, BAD_SETTING),
        (["list", b["damaged_only"]], {"CKPTIO_VERIFY": "maybe"}, BAD_SETTING),
        (["list"], None, NOT_CHECKED),
        (["list", b["empty_dir"], "--no-such-option"], None, NOT_CHECKED),
    ]
    results = _check_cases(cases)
    assert "not a URL" in results[5].stderr
    unreachable = results[7].stderr.strip()
    assert "s3://nobucket is unreachable: " in unreachable and len(unreachable.split("unreachable: ", 1)[1]) > 5


def test_bench_bad_inputs(bad, tmp_path):
    b = bad
    cases = [
        (["bench", "--dir", "/nonexistent"], None, NOT_CHECKED),
        (["bench", "--dir", b["good.pt"]], None, NOT_CHECKED),
        (["bench", "--reps", "0"], None, NOT_CHECKED),
        (["bench", "--reps", "-1"], None, NOT_CHECKED),
        (["bench", "--reps", "abc"], None, NOT_CHECKED),
        (["bench", "--size", "0"], None, NOT_CHECKED),
        (["bench", "--size", "lots"], None, NOT_CHECKED),
        (["bench", "--dir", str(tmp_path), "--json", os.path.join(b["nodir"], "b.json")], None, NOT_CHECKED),
        (["bench", "--dir", str(tmp_path), "--json", b["dir"]], None, NOT_CHECKED),
        (["bench", "--dir", str(tmp_path), "--plot", os.path.join(b["nodir"], "b.png")], None, NOT_CHECKED),
        (["bench", "--dir", str(tmp_path), "--plot", b["dir"]], None, NOT_CHECKED),
        (["bench", "--dir", str(tmp_path)], {"CKPTIO_BLOCK_MB": "abc"}, BAD_SETTING),
        (["bench", "--dir", str(tmp_path)], {"CKPTIO_STAGING_SLOTS": "many"}, BAD_SETTING),
        (["bench", "--no-such-option"], None, NOT_CHECKED),
    ]
    _check_cases(cases)
    assert not os.listdir(tmp_path)  # nothing was measured, nothing left behind


def test_inspect_and_verify_on_cut_and_flipped_files(tmp_path):
    """A checkpoint cut at every structural boundary and flipped in every
    region, and one-byte files: inspect and verify end in a documented code
    with one stderr line, every time. A cut zip checkpoint is damaged; a file
    too short to start like one is not a checkpoint."""
    good = tmp_path / "good.pt"
    ckptio.save({"w": torch.randn(16, 4), "step": 3}, good)
    data = good.read_bytes()
    with zipfile.ZipFile(good) as z:
        headers = [i.header_offset for i in z.infolist()]
    n = len(data)
    # the local headers, a payload, the directory, the zip64 end record and locator, the classic end record
    boundaries = sorted({0, 1, 3, 4, 30, *headers[1:4], headers[-1] + 40, n - 98, n - 42, n - 22, n - 1})
    cases, expected = [], []
    for cut in boundaries:
        (tmp_path / f"cut{cut}").write_bytes(data[:cut])
        cases.append(str(tmp_path / f"cut{cut}"))
        expected.append(DAMAGED if cut >= 4 else NOT_CHECKED)
    rng = random.Random(25)
    for at in sorted({0, 2, 8, 26, headers[1] + 3, headers[1] + 31, 4096 + 1, n - 90, n - 60, n - 30, n - 10,
                      *(rng.randrange(n) for _ in range(6))}):
        flipped = bytearray(data)
        flipped[at] ^= 0xFF
        (tmp_path / f"flip{at}").write_bytes(bytes(flipped))
        cases.append(str(tmp_path / f"flip{at}"))
        expected.append(None)  # damaged, not a checkpoint, or (a flip in padding) whole
    for byte in (0x00, 0x50, 0x80, 0xFF):
        (tmp_path / f"byte{byte}").write_bytes(bytes([byte]))
        cases.append(str(tmp_path / f"byte{byte}"))
        expected.append(NOT_CHECKED)
    argvs = [[command, path] for command in ("inspect", "verify") for path in cases]
    _, results = _many(argvs)
    for argv, code, out in zip(argvs, expected * 2, results):
        assert out.returncode in ((OK, DAMAGED, NOT_CHECKED, UNSAFE) if code is None else (code,)), (argv, out)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == (out.returncode != OK), (
            argv, out.stderr)
        if argv[0] == "verify":
            assert out.stdout.startswith("DAMAGED") == (out.returncode == DAMAGED), (argv, out.stdout)


def test_top_level_usage_errors_and_version():
    _check_cases([([], None, NOT_CHECKED), (["nosuchcommand"], None, NOT_CHECKED)])
    _, (out,) = _many([["--version"]])
    assert out.returncode == 0 and out.stdout.strip() == f"ckptio {ckptio.__version__}" and not out.stderr, out


def test_help_documents_the_exit_codes():
    for argv, out in zip(*_many([["--help"], ["verify", "--help"], ["convert", "--help"]])):
        assert out.returncode == 0
        for text in ("exit codes:", "1    damaged", "2    not checked", "3    bad setting", "4    unsafe"):
            assert text in out.stdout, (argv, text)


def test_debug_shows_the_traceback(bad):
    inspect, verify = run_many([(["inspect", bad["trunc.pt"], "--debug"], None), (["--debug", "verify", bad["flip.pt"]],
                                                                                  None)])
    assert inspect.returncode == DAMAGED and "Traceback" in inspect.stderr
    assert inspect.stderr.strip().splitlines()[-1].startswith("ckptio inspect: ")
    assert verify.returncode == DAMAGED


def test_console_script_bad_inputs(bad):
    """The installed script, on a few of the same inputs."""
    cases = [(["inspect", bad["x80"]], None, NOT_CHECKED), (["verify", bad["dir"]], None, NOT_CHECKED),
             (["convert", bad["unsafe.pt"], bad["nodir"] + ".pt"], None, UNSAFE),
             (["bench", "--reps", "0"], None, NOT_CHECKED)]
    _check_cases(cases, runner=run_script)


def _many(argvs, hide=()):
    """(argvs, results) of command lines run in order by one FORKING_RUNNER."""
    return argvs, run_many([(argv, None) for argv in argvs], hide=hide)


# --- what the commands show ----------------------------------------------------

def test_inspect_lists_records_and_tensors(files):
    ours, theirs, damaged = files
    _, (out, other, bad) = _many([["inspect", str(ours)], ["inspect", str(theirs)], ["inspect", str(damaged)]])
    assert out.returncode == 0, out.stderr
    for text in ("data.pkl", "data/0", "4096", "float32", "(64, 8)", "bfloat16", "ckptio-compatible"):
        assert text in out.stdout, text
    assert other.returncode == 0 and "torch.save" in other.stdout and "int64" in other.stdout
    assert bad.returncode == 1 and "BAD" in bad.stdout
    assert bad.stderr.count(str(damaged)) == 1 and "data/0" in bad.stderr


def test_inspect_output_piped_is_whole_and_plain(tmp_path, bad):
    """Piped (not a TTY): long record names and messages are never cut and hold no ANSI codes."""
    long_name = "layer_" + "x" * 150
    path = tmp_path / "long.pt"
    ckptio.save({long_name: torch.ones(3)}, path)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"c": collections.Counter(a=1), "args": argparse.Namespace(a=1)}, unsafe)
    _, (out, refused, legacy) = _many([["inspect", str(path)], ["inspect", str(unsafe)], ["inspect", bad["legacy.pt"]]])
    assert out.returncode == 0 and long_name in out.stdout and "…" not in out.stdout and "\x1b[" not in out.stdout
    assert refused.returncode == UNSAFE and "argparse.Namespace" in refused.stdout
    assert "\x1b[" not in refused.stdout + refused.stderr
    # A legacy (pre-zip) file is inspectable, with what to do about its missing checksums.
    assert legacy.returncode == 0, legacy.stderr
    assert "legacy" in legacy.stdout and "int64" in legacy.stdout and "(5,)" in legacy.stdout
    assert "ckptio convert" in legacy.stdout


@needs_dcp
def test_inspect_and_verify_a_dcp_directory(bad, tmp_path):
    stock = tmp_path / "stock"
    dcp.save({"w": torch.randn(4, 4), "n": 3}, storage_writer=dcp.FileSystemWriter(str(stock)), no_dist=True)
    _, (out, verify, damaged) = _many([["inspect", bad["dcp"]],
                                       ["verify", bad["dcp"], str(stock), bad["dcp_flip"], bad["dcp_unsafe"]],
                                       ["inspect", bad["dcp_flip"]]])
    assert out.returncode == 0, out.stderr
    for text in ("__0_0.distcp", "w", "float32", "(8, 8)", "step", "bytes", "ok"):
        assert text in out.stdout, text
    lines = verify.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["OK", "OK", "DAMAGED", "UNSAFE"], verify.stdout
    assert "'w'" in lines[2] and "argparse.Namespace" in lines[3]
    assert verify.returncode == DAMAGED and verify.stderr.strip() == "ckptio verify: 1 damaged, 1 unsafe (of 4)"
    assert damaged.returncode == DAMAGED and "BAD" in damaged.stdout and "item 'w'" in damaged.stderr


@needs_dcp
def test_verify_a_compressed_dcp_directory(tmp_path):
    """Items written through a stream transform (ZStandard) are decoded and
    their CRCs checked; bytes the codec cannot decode are damage."""
    ZStandard = pytest.importorskip("torch.distributed.checkpoint._extension").ZStandard
    if not getattr(ZStandard, "is_available", lambda: True)():
        pytest.skip("no zstd module")
    whole, flipped = tmp_path / "z", tmp_path / "z_flipped"
    dcp.save({"w": torch.randn(8, 8), "step": 3}, storage_writer=StorageWriter(whole, _extensions=[ZStandard()]),
             no_dist=True)
    shutil.copytree(whole, flipped)
    data = bytearray((flipped / "__0_0.distcp").read_bytes())
    data[60] ^= 1  # inside the first item's compressed bytes
    (flipped / "__0_0.distcp").write_bytes(bytes(data))
    _, (ok, damaged) = _many([["verify", str(whole)], ["verify", str(flipped)]])
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok
    assert damaged.returncode == DAMAGED and "'w'" in damaged.stdout and "stream.zstd" in damaged.stdout, damaged


@needs_dcp
def test_verify_a_dcp_directory_saved_without_collectives(tmp_path):
    """torch >= 2.9 saves without collectives as one __<rank>.metadata per rank, no .metadata."""
    import inspect

    if "use_collectives" not in inspect.signature(dcp.save).parameters:
        pytest.skip("this torch has no saves without collectives")
    dcp.save({"w": torch.randn(4, 4), "s": 3}, storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True,
             use_collectives=False)
    assert not (tmp_path / "ck" / ".metadata").exists() and (tmp_path / "ck" / "__0.metadata").exists()
    _, (verify, out) = _many([["verify", str(tmp_path / "ck")], ["inspect", str(tmp_path / "ck")]])
    assert verify.returncode == 0 and verify.stdout.startswith("OK"), verify
    assert out.returncode == 0 and "__0_0.distcp" in out.stdout and "(4, 4)" in out.stdout, out


def test_verify_exit_codes(files, bad):
    ours, theirs, damaged = files
    _, (whole, one_bad, missing, legacy) = _many([
        ["verify", str(ours), str(theirs)], ["verify", str(ours), str(damaged)],
        ["verify", str(ours.parent / "missing.pt")], ["verify", str(ours), bad["legacy.pt"]]])
    assert whole.returncode == 0 and not whole.stderr
    assert one_bad.returncode == 1
    lines = one_bad.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("OK") and lines[1].startswith("DAMAGED") and "data/0" in lines[1]
    assert missing.returncode == NOT_CHECKED and missing.stdout.startswith("UNCHECKED")
    assert legacy.returncode == NOT_CHECKED  # a legacy file holds no checksums: not checked, never damaged
    assert [line.split()[0] for line in legacy.stdout.splitlines()] == ["OK", "UNCHECKED"]
    assert "no checksums" in legacy.stdout


def test_convert_torch_save_legacy_and_safetensors_files(files, bad, tmp_path):
    ours, theirs, damaged = files
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({"a": torch.randn(5, 5)}, str(tmp_path / "m.safetensors"))
    _, results = _many([["convert", str(theirs), str(tmp_path / "converted.pt")],
                        ["convert", str(damaged), str(tmp_path / "no.pt")],
                        ["convert", bad["legacy.pt"], str(tmp_path / "new.pt")],
                        ["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "from_st.pt")]])
    converted, refused, legacy, from_st = results
    assert converted.returncode == 0, converted.stderr
    assert torch.equal(ckptio.load(tmp_path / "converted.pt")["x"], torch.arange(10))
    assert refused.returncode == DAMAGED and not (tmp_path / "no.pt").exists()  # refuses a damaged source
    assert legacy.returncode == 0, legacy.stderr
    assert torch.equal(ckptio.load(tmp_path / "new.pt")["x"], torch.arange(5))
    assert from_st.returncode == 0, from_st.stderr
    ckptio.verify(tmp_path / "from_st.pt")


def test_convert_writes_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tied = torch.randn(6, 4)
    state = {"model": {"embed": tied, "head": tied, "t": torch.randn(4, 6).t(), "layers": [torch.ones(2)]},
             "step": 10, "name": "run"}
    src = tmp_path / "ck.pt"
    ckptio.save(state, src)
    dst, back = tmp_path / "model.safetensors", tmp_path / "back.pt"
    _, (refused, out, again) = _many([["convert", str(src), str(dst)],
                                      ["convert", str(src), str(dst), "--tensors-only"],
                                      ["convert", str(dst), str(back)]])  # and back again, read as before
    assert refused.returncode == UNSUPPORTED and "'step'" in refused.stderr and "--tensors-only" in refused.stderr
    assert out.returncode == 0, out.stderr
    assert "step, name" in out.stdout and "model.head" in out.stdout  # what was left out, and copied
    loaded = safetensors_torch.load_file(str(dst))
    assert sorted(loaded) == ["model.embed", "model.head", "model.layers.0", "model.t"]
    assert torch.equal(loaded["model.embed"], tied) and torch.equal(loaded["model.head"], tied)
    assert torch.equal(loaded["model.t"], state["model"]["t"])
    assert again.returncode == 0, again.stderr
    assert torch.equal(ckptio.load(back)["model.t"], state["model"]["t"])


def test_safetensors_export_every_dtype_exact(tmp_path):
    """Every dtype safetensors names, views, non-contiguous, 0-dim and empty
    tensors: bit-exact through safetensors' own reader."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    base = torch.arange(100.0)
    state = {"f64": torch.randn(3, dtype=torch.float64), "f16": torch.randn(4).half(),
             "bf16": torch.randn(7).bfloat16(), "bool": torch.rand(5) > 0.5, "u8": torch.arange(6, dtype=torch.uint8),
             "i8": torch.arange(3, dtype=torch.int8),
             "i16": torch.arange(3, dtype=torch.int16), "i32": torch.arange(3, dtype=torch.int32),
             "u16": torch.arange(9).to(torch.uint16), "u32": torch.arange(9).to(torch.uint32),
             "u64": torch.arange(9).to(torch.uint64), "c64": torch.randn(3, dtype=torch.complex64),
             "f8": torch.randn(3).to(torch.float8_e4m3fn), "f8b": torch.randn(3).to(torch.float8_e5m2),
             "scalar": torch.tensor(2.0), "empty": torch.empty(0, 3), "t": torch.randn(5, 6).t(),
             "view": base[10:20], "view2": base[50:], "strided": base[::7]}
    from ckptio.safetensors_export import export_safetensors

    result = export_safetensors(state, str(tmp_path / "all.safetensors"))
    assert sorted(result.copied_shared) == ["strided", "view2"]  # views of "view"'s storage
    loaded = safetensors_torch.load_file(str(tmp_path / "all.safetensors"))
    assert sorted(loaded) == sorted(state)
    for name, t in state.items():
        got = loaded[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), name


def test_bench_writes_json_and_plot(tmp_path):
    plot = importlib.util.find_spec("matplotlib") is not None
    out = run("bench", "--dir", str(tmp_path), "--size", "16MiB", "--reps", "1", "--json", str(tmp_path / "b.json"),
              *(["--plot", str(tmp_path / "b.png")] if plot else []))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["results"]["ckptio.save (durable)"]["median_s"] > 0
    if plot:
        assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The base install has none of the [cli] extras: the commands run with rich,
# matplotlib and safetensors unimportable (as in a venv without them).
CLI_EXTRAS = ("rich", "matplotlib", "safetensors")


def test_commands_work_without_the_cli_extras(files, tmp_path):
    ours, theirs, damaged = files
    converted, exported = tmp_path / "converted.pt", tmp_path / "x.safetensors"
    _, (out, bad, verify, convert, plot, export, read_st) = _many([
        ["inspect", str(ours)], ["inspect", str(damaged)], ["verify", str(ours), str(theirs)],
        ["convert", str(theirs), str(converted)], ["bench", "--plot", str(tmp_path / "p.png")],
        ["convert", str(theirs), str(exported)], ["convert", str(exported), str(tmp_path / "back.pt")]],
        hide=CLI_EXTRAS)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{ours}: records" and lines[1].split() == ["record", "bytes", "offset", "alignment", "CRC-32",
                                                                   "CRC", "status"]
    assert any(line.split()[:1] == ["data/0"] and line.split()[-1] == "ok" for line in lines)
    assert any(line.split()[:2] == ["w", "float32"] for line in lines)  # the tensors table
    assert bad.returncode == 1 and "BAD" in bad.stdout and "[red]" not in bad.stdout
    assert verify.returncode == 0
    assert convert.returncode == 0, convert.stderr
    assert torch.equal(ckptio.load(converted)["x"], torch.arange(10))
    assert plot.returncode == UNSUPPORTED
    assert plot.stderr.strip() == "ckptio bench: --plot needs matplotlib: pip install 'ckptio[cli]'"
    assert export.returncode == 0, export.stderr  # writing .safetensors needs neither safetensors nor numpy
    assert read_st.returncode == UNSUPPORTED and "pip install 'ckptio[cli]'" in read_st.stderr
    assert len(read_st.stderr.strip().splitlines()) == 1 and "Traceback" not in read_st.stderr
    if importlib.util.find_spec("safetensors") is not None:
        from safetensors.torch import load_file

        assert torch.equal(load_file(str(exported))["x"], torch.arange(10))


def test_no_numpy_warning_without_numpy(files, tmp_path):
    """A base install has no numpy; torch then warns "Failed to initialize
    NumPy" on import. No CLI command may show it."""
    fake = tmp_path / "no_numpy" / "numpy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'numpy'\", name='numpy')\n")
    ours, _, _ = files
    env = {"PYTHONPATH": str(fake.parent)}
    for argv in (["inspect", str(ours)], ["verify", str(ours)], ["--version"]):
        out = run_script(*argv, env=env)
        assert out.returncode == 0, out.stderr
        assert "NumPy" not in out.stderr, out.stderr


def test_console_script_on_this_install(files, tmp_path):
    """The installed `ckptio` command as a user runs it. `make test-compat`
    runs this in a venv holding only the wheel, torch and pytest
    (CKPTIO_EXPECT_BASE_INSTALL=1), where the extras must really be absent."""
    absent = [name for name in CLI_EXTRAS if importlib.util.find_spec(name) is None]
    if os.environ.get("CKPTIO_EXPECT_BASE_INSTALL") == "1":
        assert absent == list(CLI_EXTRAS), "a base install should hold none of the [cli] extras"
    assert os.access(SCRIPT, os.X_OK), f"no console script at {SCRIPT}"
    ours, theirs, damaged = files

    commands = [("inspect", str(ours)), ("inspect", str(damaged)), ("verify", str(ours), str(theirs)),
                ("convert", str(theirs), str(tmp_path / "converted.pt"))]
    if "matplotlib" in absent:
        commands.append(("bench", "--plot", str(tmp_path / "p.png")))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda argv: run_script(*argv), commands))
    out, damaged_out, verify, convert = results[:4]
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "data/0" in out.stdout and "float32" in out.stdout
    assert damaged_out.returncode == 1
    assert verify.returncode == 0
    assert convert.returncode == 0, convert.stderr
    assert torch.equal(ckptio.load(tmp_path / "converted.pt")["x"], torch.arange(10))
    if "matplotlib" in absent:
        plot = results[4]
        assert plot.returncode == UNSUPPORTED and "pip install 'ckptio[cli]'" in plot.stderr
        assert "Traceback" not in plot.stderr
