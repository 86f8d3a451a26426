"""``hescape data ...`` through the real dispatcher: output, help, non-zero exits."""

from __future__ import annotations

import numpy as np
import pytest

import hescape.cli as cli


@pytest.fixture
def run(monkeypatch, capsys):
    monkeypatch.setattr(cli, "GROUPS", ("data",))  # other groups are not under test here

    def _run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(["data", *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


def test_simulate_describe_validate(run, tmp_path):
    out = str(tmp_path / "sim")
    code, text, _ = run("simulate", "--out", out, "--n-donors", "3", "--spots-per-donor", "20",
                        "--patch-size", "16", "--n-genes", "12", "--no-progress")
    assert code == 0 and "donors       3" in text
    code, text, _ = run("describe", out)
    assert code == 0 and "D02" in text and "split" in text and "genes 12" in text
    code, text, _ = run("validate", out, "--verify")
    assert code == 0 and text.startswith("ok:")
    code, _, err = run("simulate", "--out", out, "--no-progress")
    assert code == 2 and "already exists" in err and "--overwrite" in err


def test_validate_malformed_exits_nonzero(run, tmp_path):
    out = tmp_path / "sim"
    run("simulate", "--out", str(out), "--n-donors", "2", "--spots-per-donor", "20",
        "--patch-size", "16", "--n-genes", "12", "--no-progress")
    np.save(out / "patches.npy", np.zeros((3, 16, 16, 3), np.uint8))
    code, _, err = run("validate", str(out))
    assert code == 2 and "3 patches but 40 obs rows" in err
    code, _, err = run("validate", str(tmp_path / "nothing"))
    assert code == 2 and "not found" in err and "hescape data simulate" in err


def test_split_file_error_exits_nonzero(run, tmp_path):
    f = tmp_path / "split.csv"
    f.write_text("donor,split\nD00,train\nD01,test\nD01,val\n")
    code, _, err = run("simulate", "--out", str(tmp_path / "s"), "--n-donors", "2",
                       "--spots-per-donor", "20", "--split-file", str(f), "--no-progress")
    assert code == 2 and "donor 'D01' is in both" in err
    assert not (tmp_path / "s").exists()


def test_help_lists_commands(run, capsys):
    with pytest.raises(SystemExit) as exc:
        run("--help")
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("simulate", "import-hescape", "import-hest", "import-visium", "import",
                "validate", "describe", "examples:"):
        assert cmd in text
