"""What commands share: a run directory taken the same way everywhere."""

from __future__ import annotations

import pytest

from loralab.cli.main import main


@pytest.mark.parametrize("command", ["eval", "merge", "generate"])
def test_run_directory_is_taken_the_same_way_everywhere(command, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    extra = ["--out", str(tmp_path / "merged")] if command == "merge" else []
    for argv in ([command, missing, *extra], [command, "--run", missing, *extra]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "nope" in err[0] and "not found" in err[0], err
    assert main([command, missing, "--run", str(tmp_path / "other"), *extra]) == 2
    assert "two run directories" in capsys.readouterr().err
    if command != "eval":  # eval also takes --model instead of a run
        assert main([command, *extra]) == 2
        assert "needs a run directory" in capsys.readouterr().err
