"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs in a fresh Python process whose working directory is an empty
temporary directory, so it must be complete (its own imports, data and model)
and may write only there. Two markers, each an HTML comment on the line right
before the fence (invisible on GitHub, visible in the source):

    <!-- not-run: needs a GPU -->   the block is not run; the reason is counted and shown
    <!-- continues -->              the block runs after the file's previous block, in one
                                    process, as a reader who typed both would run them

A block that fails shows its file and line in the test id and its stderr.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

from conftest import service_pids

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(.+?)\s*-->\s*$")
CONTINUES = re.compile(r"^\s*<!--\s*continues\s*-->\s*$")
TIMEOUT_S = 180


class Block(NamedTuple):
    file: str      # relative to the repository root
    line: int      # 1-based line of the opening fence
    code: str      # the block's code, dedented
    not_run: Optional[str]  # the reason given by a not-run marker
    continues: bool


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of one Markdown file, with their markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, language = opening.groups()
        end = i + 1
        while end < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[end]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.name}:{i + 1}: a fence that never closes")
        if language.lower() in ("py", "python3", "pycon", "python-repl", "ipython"):
            raise AssertionError(f"{path.name}:{i + 1}: write ```python (this runner executes only those), "
                                 f"not ```{language}")
        if language == "python":
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            not_run = NOT_RUN.match(before)
            blocks.append(Block(str(path.relative_to(ROOT)), i + 1,
                                textwrap.dedent("\n".join(lines[i + 1:end])) + "\n",
                                not_run.group(1) if not_run else None, bool(CONTINUES.match(before))))
        i = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in doc_files() for block in python_blocks(path)]


BLOCKS = all_blocks()


def program(block: Block) -> str:
    """The block's code, after the blocks it continues (in file order)."""
    same_file = [b for b in BLOCKS if b.file == block.file]
    chain = [block]
    index = same_file.index(block)
    while chain[0].continues:
        assert index > 0, f"{block.file}:{block.line}: 'continues' with no block before it"
        index -= 1
        chain.insert(0, same_file[index])
    return "".join(f"# {b.file}:{b.line}\n{b.code}" for b in chain)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.file}:{b.line}" for b in BLOCKS])
def test_block_runs(block: Block, tmp_path: Path) -> None:
    if block.not_run:
        pytest.skip(f"not-run: {block.not_run}")
    script = tmp_path / "snippet.py"
    script.write_text(program(block), encoding="utf-8")
    work = tmp_path / "cwd"
    work.mkdir()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", CKPTIO_EXAMPLES=str(ROOT / "examples"))
    for name in [n for n in env if n.startswith("CKPTIO_") and n != "CKPTIO_EXAMPLES"]:
        del env[name]  # the defaults the docs describe ...
    env["CKPTIO_SERVICE_DIR"] = str(tmp_path / "service")  # ... but a checkpoint service of the block's own
    try:
        out = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    finally:
        stop_services(tmp_path / "service")
    assert out.returncode == 0, (f"{block.file}:{block.line} failed (exit {out.returncode}):\n"
                                 f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def stop_services(directory: Path) -> None:
    """SIGTERM the checkpoint service of `directory` (if one started) and wait for it."""
    for pid in service_pids(directory):
        os.kill(pid, 15)
        for _ in range(600):
            if not service_pids(directory):
                return
            time.sleep(0.05)
        raise AssertionError(f"the checkpoint service of {directory} did not stop on SIGTERM")


def test_every_block_is_counted(capsys: pytest.CaptureFixture[str]) -> None:
    """How many blocks this file runs, and which are marked not-run and why."""
    skipped = [b for b in BLOCKS if b.not_run]
    with capsys.disabled():
        print(f"\ntest_docs.py: {len(BLOCKS) - len(skipped)} python blocks of README.md and docs/*.md run, "
              f"{len(skipped)} marked not-run" + "".join(f"\n  {b.file}:{b.line}: {b.not_run}" for b in skipped))
    assert len(BLOCKS) - len(skipped) >= 13  # the blocks there were when this was written: none may vanish unseen
    assert len(skipped) <= 3, "a block that cannot run as written is an exception: make it runnable"


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    """Every relative link (file, and #heading where given) names something that
    exists, so moving a section between README.md and docs/ cannot leave one dead."""
    text = path.read_text(encoding="utf-8")
    dead = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s):, mailto:
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            dead.append(target)
        elif fragment and linked.suffix == ".md":
            headings = re.findall(r"^#+\s+(.+)$", linked.read_text(encoding="utf-8"), re.M)
            if fragment not in {anchor(h) for h in headings}:
                dead.append(target)
    assert dead == [], f"{path.name}: links to nothing: {dead}"


# The examples: each runs as its docstring says, prints where it wrote, and
# leaves nothing behind unless asked to keep it. (lightning_async.py is what
# `make demo` runs; lightning_two_tier.py runs in test_tiers.py.)

def test_service_example_resumes_a_killed_trainer_from_memory_and_cleans_up(dirs: tuple[Path, Path]) -> None:
    out = run_example("lightning_service.py", cwd=dirs[0], tmp=dirs[1])
    assert "trainer killed by signal 9 after step 10" in out
    assert "resumed from step 10 (read from the memory tier), trained on to step 20" in out
    assert leftovers(*dirs) == []
    assert service_pids(dirs[1], under=True) == []  # the example stopped its service

EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, cwd: Path, tmp: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTIO_")}
    env.update(TMPDIR=str(tmp), PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, f"{name} failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    return cwd, tmp


def leftovers(cwd: Path, tmp: Path) -> list[str]:
    """What is left in the working directory, and in TMPDIR of ckptio's or an
    example's making (torch keeps caches of its own there: torchinductor_<user>)."""
    return sorted([str(p) for p in cwd.iterdir()] + [str(p) for p in tmp.iterdir() if "ckptio" in p.name])


def test_save_load_example_prints_each_timing_and_cleans_up(dirs: tuple[Path, Path]) -> None:
    out = run_example("save_load.py", cwd=dirs[0], tmp=dirs[1])
    for line in ("ckptio.save: ", "ckptio.load (CRC-32 verified): ", "torch.load (nothing verified): "):
        assert re.search(rf"^{re.escape(line)}.*\d+\.\d ms", out, re.M), (line, out)
    assert "plain torch.load reads the same tensors: True" in out
    assert leftovers(*dirs) == []


def test_custom_loop_example_says_where_it_wrote_and_cleans_up(dirs: tuple[Path, Path]) -> None:
    out = run_example("custom_loop.py", cwd=dirs[0], tmp=dirs[1])
    where = re.search(r"^checkpoints in (\S+) \(removed at the end", out, re.M)
    assert where and where.group(1).startswith(str(dirs[1])), out
    assert "resumed from step_40.pt" in out
    assert leftovers(*dirs) == []


def test_custom_loop_example_keeps_a_directory_it_is_given(dirs: tuple[Path, Path]) -> None:
    out = run_example("custom_loop.py", "kept", cwd=dirs[0], tmp=dirs[1])
    assert "checkpoints in kept\n" in out
    assert sorted(os.listdir(dirs[0] / "kept")) == ["latest", "step_40.pt", "step_50.pt", "step_60.pt"]


def test_dcp_example_says_where_it_wrote_and_cleans_up(dirs: tuple[Path, Path]) -> None:
    out = run_example("dcp_fsdp.py", cwd=dirs[0], tmp=dirs[1])
    where = re.search(r"^checkpoints in (\S+) \(removed at the end", out, re.M)
    assert where and where.group(1).startswith(str(dirs[1])), out
    assert "reloaded and verified on 2 ranks" in out
    assert leftovers(*dirs) == []
