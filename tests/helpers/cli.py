"""The command line's error contract, as the tests check it: a user error is one line on stderr
that starts ``hypermerge: error:``, a non-zero exit, and no traceback."""

from __future__ import annotations

from click.testing import Result


def assert_one_line_error(result: Result, *fragments: str, exit_code: int | None = None) -> str:
    """Assert that a ``CliRunner`` run failed with the CLI's one-line error.

    Args:
        result: what ``CliRunner().invoke(cli, ...)`` returned.
        *fragments: texts the error line must contain.
        exit_code: the exact exit status expected; any non-zero one when None.

    Returns:
        The error line, for checks of its own.
    """
    if exit_code is None:
        assert result.exit_code != 0, result.output
    else:
        assert result.exit_code == exit_code, result.output
    # click exits through SystemExit; any other exception is a bug the runner would hide
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("hypermerge: error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]
