"""The ckptio command line: inspect, verify, convert, list, bench, serve.

    ckptio inspect PATH            records, tensors and CRC state of a torch.save file (zip or legacy)
                                   or of a DCP checkpoint directory
    ckptio verify PATH...          every CRC and the structure; one line per path; exit 0 only if all whole
    ckptio convert SRC DST         torch.save / safetensors -> ckptio's aligned, checksummed layout,
                                   or -> DST.safetensors (tensors only)
    ckptio list DIR [--remote URL] a CheckpointManager's checkpoints per tier: whole / damaged / remote-only
    ckptio bench [--dir D] [--size 1GiB] [--json] [--plot out.png]
    ckptio serve [--foreground | --status | --stop]   the per-node checkpoint service (ckptio.cli_serve)
    ckptio --version

A script can rely on this: whatever the input, a command never shows a
traceback (``--debug`` does); on failure it prints exactly one line to
stderr and exits with one of the codes below (ckptio.cli_outcome):

    0    ok (verify: every checkpoint whole)
    1    damaged: a CRC-32 mismatch or broken structure (the only code that means damaged)
    2    not checked / bad input: missing, a directory, unreadable, not a checkpoint, a legacy
         file (no checksums), a bad argument, an unwritable destination, an unreachable remote
    3    bad setting: a CKPTIO_* environment variable ckptio cannot use
    4    unsafe: a pickle names a global that weights-only loading refuses
    5    unsupported: what safetensors cannot hold, a missing optional package, an unknown DCP
         stream transform, a TorchScript archive
    70   internal error (a bug: rerun with --debug and report it)
    130  interrupted
    141  stdout closed early (| head)

Output is plain text whenever stdout is not a terminal: nothing cut to a
terminal's width, no ANSI codes. docs/cli.md has the details.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from .cli_outcome import EXIT_CODES_HELP, CliFailure, Exit, failure_from

__all__ = ["main"]

# torch warns "Failed to initialize NumPy" when it is imported without numpy
# (ckptio's base install): ckptio never needs numpy, so the warning is noise.
# The filter here covers torch imported from a command; the package's own
# import of torch (ckptio/__init__.py, which runs before this module) needs
# the same filter there.
_NUMPY_WARNING = "Failed to initialize NumPy"


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=_NUMPY_WARNING, category=UserWarning)
    parser = _parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        _check_settings()
        return int(args.fn(args))
    except SystemExit:
        raise
    except BrokenPipeError:  # stdout closed early (`ckptio inspect big.pt | head`): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return Exit.STDOUT_CLOSED
    except BaseException as e:  # noqa: BLE001 - the one place a command's failure becomes a line and a code
        failure = failure_from(e, _subject(args))
        if debug:
            traceback.print_exc()
        print(_line(args.command, failure, _subject(args)), file=sys.stderr, flush=True)
        return int(failure.code)


def _line(command: str, failure: CliFailure, subject: str | None) -> str:
    path = failure.path if failure.path is not None else subject
    return f"ckptio {command}: {path}: {failure.message}" if path else f"ckptio {command}: {failure.message}"


def _subject(args: argparse.Namespace) -> str | None:
    """The path a command's failure line names by default."""
    for name in ("path", "src", "directory"):
        value = getattr(args, name, None)
        if value:
            return str(value)
    return None


def _check_settings() -> None:
    """Every CKPTIO_* variable, validated before any work: a bad one is a bad
    setting (exit 3), never mistaken for a damaged checkpoint."""
    from . import config

    for reader in ("engine_config", "verify_by_default", "staging_config", "remote_read_config",
                   "remote_copy_config", "service_config"):
        fn = getattr(config, reader, None)
        if fn is not None:
            fn()
    config.resolve_snapshot_mode(None)


# --- list ------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace) -> int:
    from .manager import CheckpointManager

    if not os.path.isdir(args.directory):
        what = "is not a directory" if os.path.exists(args.directory) else "no such directory"
        raise CliFailure(Exit.NOT_CHECKED, what)
    if args.remote is not None and "://" not in args.remote:
        raise CliFailure(Exit.NOT_CHECKED, f"--remote {args.remote!r} is not a URL: give an fsspec URL prefix such as "
                                           "s3://bucket/run or file:///path/to/dir", path="")
    try:
        manager = CheckpointManager(args.directory, keep_last=None, remote=args.remote, prefix=args.prefix,
                                    suffix=args.suffix)
    except ValueError as e:
        raise CliFailure(Exit.NOT_CHECKED, " ".join(str(e).split()), path="") from e
    unreachable = None
    if args.remote is not None:
        try:
            manager.remote_steps()  # listed here first: inventory() says "unreachable" but not why
        except Exception as e:  # noqa: BLE001 - any failure to list the remote tier is reported, with its reason
            unreachable = f"{type(e).__name__}: {' '.join(str(e).split())}" if str(e) else type(e).__name__
    rows = manager.inventory()
    memory = manager.memory_inventory()  # a column only where the memory tier holds this directory's checkpoints
    steps = {row[0] for row in rows}
    rows += [(step, None, None) for step in memory if step not in steps]
    rows.sort(key=lambda row: -row[0])
    column = f"  {'memory':<8}" if memory else ""
    print(f"{'step':>10}  {'local':<8}  {'remote':<11}{column}  note")  # plain columns: scripts parse it
    for step, local, remote in rows:
        note = "remote-only" if local is None and remote else ("local-only" if remote is None and args.remote else "")
        if local is None and remote is None:
            note = "memory-only"
        column = f"  {memory.get(step) or '-':<8}" if memory else ""
        print(f"{step:>10}  {local or '-':<8}  {remote or '-':<11}{column}  {note}".rstrip(), flush=True)
    if unreachable is not None:
        raise CliFailure(Exit.NOT_CHECKED, f"the remote tier {args.remote} is unreachable: {unreachable}", path="")
    if not rows:
        raise CliFailure(Exit.NOT_CHECKED, f"no checkpoints named {args.prefix}<step>{args.suffix} here")
    if not any("whole" in (local, remote, memory.get(step)) for step, local, remote in rows):
        raise CliFailure(Exit.DAMAGED, "damaged: no checkpoint here is whole")
    return Exit.OK


# --- bench -----------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    from ._console import console
    from .bench import check_bench_args, run_bench

    check_bench_args(args)
    return run_bench(args, console())


def _parse_size(text: str) -> int:
    units = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = int(float(num) * units[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"size {text!r}: use e.g. 512MiB or 1GiB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r}: must be more than 0 bytes")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


# --- the parser ------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse's usage errors in one line ("ckptio bench: error: ..."), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(Exit.NOT_CHECKED)


def _version() -> str:
    from . import __version__

    return f"ckptio {__version__}"


class _VersionAction(argparse.Action):
    """--version without importing anything it does not need to print it."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(_version())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    from .cli_convert import cmd_convert
    from .cli_inspect import cmd_inspect
    from .cli_serve import add_serve_command
    from .cli_verify import cmd_verify

    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on failure, show the traceback as well")
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="ckptio", description="PyTorch checkpoints at the speed of the disk.", epilog=EXIT_CODES_HELP,
                     formatter_class=fmt, parents=[common])
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=EXIT_CODES_HELP, formatter_class=fmt,
                              parents=[common])

    p = command("inspect", "records, tensors and CRC state of a torch.save file (zip or legacy) or a DCP checkpoint "
                           "directory")
    p.add_argument("path")
    p.set_defaults(fn=cmd_inspect)
    p = command("verify", "check every CRC and the structure; one line per path; exit 0 only if all are whole")
    p.add_argument("paths", nargs="+", metavar="path")
    p.set_defaults(fn=cmd_verify)
    p = command("list", "a CheckpointManager directory's checkpoints per tier, with their state")
    p.add_argument("directory")
    p.add_argument("--remote", default=None, help="the manager's remote tier (an fsspec URL prefix)")
    p.add_argument("--prefix", default="step_")
    p.add_argument("--suffix", default=".pt")
    p.set_defaults(fn=cmd_list)
    p = command("convert", "rewrite a torch.save or safetensors file in ckptio's layout, or export its tensors to "
                           "DST.safetensors")
    p.add_argument("src")
    p.add_argument("dst", help="NAME.safetensors writes safetensors; any other name ckptio's layout")
    p.add_argument("--unsafe", action="store_true", help="load SRC with weights_only=False (trusted files only)")
    p.add_argument("--tensors-only", action="store_true",
                   help="for .safetensors: leave out values that are not tensors (refused otherwise)")
    p.set_defaults(fn=cmd_convert)
    p = command("bench", "save/load/stall against torch.save, Lightning and DCP on this disk")
    p.add_argument("--dir", default=".", help="directory on the disk to measure (default: .)")
    p.add_argument("--size", type=_parse_size, default=_parse_size("1GiB"), help="state size, e.g. 512MiB, 1GiB")
    p.add_argument("--reps", type=_positive_int, default=3, help="measured runs per case, after one warm-up")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write results as JSON (to a file, or stdout)")
    p.add_argument("--plot", default=None, help="write a bar chart PNG")
    p.set_defaults(fn=cmd_bench)
    add_serve_command(command)
    return parser


if __name__ == "__main__":
    sys.exit(main())
