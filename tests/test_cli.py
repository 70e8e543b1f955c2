"""The `ckptio` command on real files: output, and exit codes on intact and
damaged files."""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import ckptio


def run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "ckptio", *args], capture_output=True, text=True, timeout=600,
                          **kwargs)


@pytest.fixture
def files(tmp_path):
    ours = tmp_path / "ours.pt"
    ckptio.save({"w": torch.randn(64, 8), "b": torch.ones(3, dtype=torch.bfloat16), "step": 4}, ours)
    theirs = tmp_path / "theirs.pt"
    torch.save({"x": torch.arange(10)}, theirs)
    damaged = tmp_path / "damaged.pt"
    data = bytearray(ours.read_bytes())
    with zipfile.ZipFile(ours) as z:
        header = z.getinfo("ours/data/0").header_offset
    n = int.from_bytes(data[header + 26 : header + 28], "little")
    m = int.from_bytes(data[header + 28 : header + 30], "little")
    data[header + 30 + n + m + 5] ^= 0x40
    damaged.write_bytes(bytes(data))
    return ours, theirs, damaged


def test_inspect_lists_records_and_tensors(files):
    ours, theirs, damaged = files
    out = run("inspect", str(ours))
    assert out.returncode == 0, out.stderr
    for text in ("data.pkl", "data/0", "4096", "float32", "(64, 8)", "bfloat16", "ckptio-compatible"):
        assert text in out.stdout, text
    out = run("inspect", str(theirs))
    assert out.returncode == 0 and "torch.save" in out.stdout and "int64" in out.stdout
    out = run("inspect", str(damaged))
    assert out.returncode == 1 and "BAD" in out.stdout


def test_verify_exit_codes(files):
    ours, theirs, damaged = files
    assert run("verify", str(ours), str(theirs)).returncode == 0
    out = run("verify", str(ours), str(damaged))
    assert out.returncode == 1
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("OK") and lines[1].startswith("DAMAGED") and "data/0" in lines[1]
    assert run("verify", str(ours.parent / "missing.pt")).returncode == 1


def test_convert_torch_save_files(files, tmp_path):
    ours, theirs, damaged = files
    out = run("convert", str(theirs), str(tmp_path / "converted.pt"))
    assert out.returncode == 0, out.stderr
    assert torch.equal(ckptio.load(tmp_path / "converted.pt")["x"], torch.arange(10))
    assert run("convert", str(damaged), str(tmp_path / "no.pt")).returncode != 0  # refuses a damaged source


def test_convert_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({"a": torch.randn(5, 5)}, str(tmp_path / "m.safetensors"))
    assert run("convert", str(tmp_path / "m.safetensors"), str(tmp_path / "from_st.pt")).returncode == 0
    ckptio.verify(tmp_path / "from_st.pt")


def test_bench_writes_json(tmp_path):
    out = run("bench", "--dir", str(tmp_path), "--size", "16MiB", "--reps", "1", "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["results"]["ckptio.save (durable)"]["median_s"] > 0


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = run("bench", "--dir", str(tmp_path), "--size", "16MiB", "--reps", "1", "--plot", str(tmp_path / "b.png"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The base install has none of the [cli] extras: the commands run with rich,
# matplotlib and safetensors unimportable (as in a venv without them).
NO_EXTRAS = ("import sys; sys.modules.update(dict.fromkeys(['rich', 'matplotlib', 'safetensors'], None)); "
             "from ckptio.cli import main; sys.exit(main(sys.argv[1:]))")


def run_without_extras(*args):
    return subprocess.run([sys.executable, "-c", NO_EXTRAS, *args], capture_output=True, text=True, timeout=600)


def test_commands_work_without_the_cli_extras(files, tmp_path):
    ours, theirs, damaged = files
    out = run_without_extras("inspect", str(ours))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{ours}: records" and lines[1].split() == ["record", "bytes", "offset", "alignment", "CRC-32",
                                                                   "CRC", "status"]
    assert any(line.split()[:1] == ["data/0"] and line.split()[-1] == "ok" for line in lines)
    assert any(line.split()[:2] == ["w", "float32"] for line in lines)  # the tensors table
    bad = run_without_extras("inspect", str(damaged))
    assert bad.returncode == 1 and "BAD" in bad.stdout and "[red]" not in bad.stdout
    assert run_without_extras("verify", str(ours), str(theirs)).returncode == 0
    converted = tmp_path / "converted.pt"
    out = run_without_extras("convert", str(theirs), str(converted))
    assert out.returncode == 0, out.stderr
    assert torch.equal(ckptio.load(converted)["x"], torch.arange(10))
    plot = run_without_extras("bench", "--plot", str(tmp_path / "p.png"))
    assert plot.returncode == 1 and "ckptio bench --plot needs matplotlib: pip install 'ckptio[cli]'" in plot.stderr
    assert "Traceback" not in plot.stderr


CLI_EXTRAS = ("rich", "matplotlib", "safetensors")


def test_console_script_on_this_install(files, tmp_path):
    """The installed `ckptio` command as a user runs it. `make test-compat`
    runs this in a venv holding only the wheel, torch and pytest
    (CKPTIO_EXPECT_BASE_INSTALL=1), where the extras must really be absent."""
    absent = [name for name in CLI_EXTRAS if importlib.util.find_spec(name) is None]
    if os.environ.get("CKPTIO_EXPECT_BASE_INSTALL") == "1":
        assert absent == list(CLI_EXTRAS), "a base install should hold none of the [cli] extras"
    script = os.path.join(os.path.dirname(sys.executable), "ckptio")
    assert os.access(script, os.X_OK), f"no console script at {script}"
    ours, theirs, damaged = files

    def cli(*args):
        return subprocess.run([script, *args], capture_output=True, text=True, timeout=600)

    out = cli("inspect", str(ours))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "data/0" in out.stdout and "float32" in out.stdout
    assert cli("inspect", str(damaged)).returncode == 1
    assert cli("verify", str(ours), str(theirs)).returncode == 0
    out = cli("convert", str(theirs), str(tmp_path / "converted.pt"))
    assert out.returncode == 0, out.stderr
    assert torch.equal(ckptio.load(tmp_path / "converted.pt")["x"], torch.arange(10))
    if "matplotlib" in absent:
        plot = cli("bench", "--plot", str(tmp_path / "p.png"))
        assert plot.returncode == 1 and "pip install 'ckptio[cli]'" in plot.stderr and "Traceback" not in plot.stderr
