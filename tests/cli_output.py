"""What the tests of `memscan` commands read from their stderr."""

from __future__ import annotations

LOADING = "memscan: loading model "
STATUS = (LOADING, "memscan: compiling the scan plan ")  # the lines a model's load says on stderr


def one_line_error(capsys, code: int) -> str:
    """The one `memscan: error:` line of a usage error (exit 2), besides the loading lines of the commands run
    (an error found only once the model is loaded, such as a calibration for another model, follows one)."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith(STATUS)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("memscan: error:") and "Traceback" not in err, err
    return lines[0]
