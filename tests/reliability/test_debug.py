"""``--debug`` and ``HYPERMERGE_DEBUG=1`` show the full traceback of a user error (for bug
reports); without them the same error is one line. A bug (any other exception) always keeps its
traceback."""

from __future__ import annotations

import pytest

from tests.helpers.reliability import run_cli


@pytest.mark.parametrize(("command", "error"), [
    (["export", "{tmp}/nowhere", "--out", "{tmp}/out"], "CheckpointError"),
    (["patch", "{tmp}/nowhere", "--adapter", "{tmp}/nowhere", "--out", "{tmp}/out"], "CheckpointError"),
    (["fold", "--adapter", "{tmp}", "--out", "{tmp}/out", "--dtype", "float16", "--max-shard-size", "lots"],
     "ConfigError"),
])
def test_debug_shows_the_traceback(command, error, tmp_path):
    args = [part.format(tmp=tmp_path) for part in command]
    plain = run_cli(*args)
    assert plain.returncode != 0 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
    flag = run_cli("--debug", *args)
    variable = run_cli(*args, env={"HYPERMERGE_DEBUG": "1"})
    for done in (flag, variable):
        assert done.returncode != 0
        assert "Traceback (most recent call last)" in done.stderr and error in done.stderr, done.stderr
        assert "hypermerge/" in done.stderr  # the frames of the package, for the bug report
    assert not (tmp_path / "out").exists()


def test_a_bug_keeps_its_traceback_without_debug(tmp_path):
    # Not a HypermergeError: the CLI must not dress it up as a user error.
    import subprocess
    import sys

    from tests.helpers.common import subprocess_env

    script = ("import sys\nfrom hypermerge import cli\n"
              "def broken(*args, **kwargs):\n    raise ZeroDivisionError('a bug')\n"
              "import hypermerge.fold\nhypermerge.fold.fold_checkpoint = broken\n"
              "cli.main(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", script, "fold", "--adapter", str(tmp_path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "ZeroDivisionError: a bug" in done.stderr
