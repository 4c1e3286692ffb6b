"""What a failed prediction writes into its own logs (which reach the client): one line, never a traceback."""

import pytest

from cog_base.cog016 import serving
from cog_base.predictor import ExpectedFault, UnexpectedError


def _fail(error: BaseException) -> None:
    try:
        raise error
    except BaseException:
        # What Cog 0.16.12's worker calls when predict() raises.
        from cog.server import worker

        worker.traceback.print_exc()


def _unexpected() -> UnexpectedError:
    try:
        open("/srv/secret/weights/model.bin")
    except OSError as cause:
        error = UnexpectedError("unexpected server error (FileNotFoundError); it is logged on the server")
        error.__cause__ = cause
        return error


@pytest.mark.parametrize("error, line", [
    (ValueError("scale must be between 0.1 and 30.0"), "Input error: scale must be between 0.1 and 30.0"),
    (ExpectedFault("out of GPU memory for 4 sample(s)"), "Server fault: out of GPU memory for 4 sample(s)"),
    (_unexpected(), "Server error: unexpected server error (FileNotFoundError); it is logged on the server"),
], ids=["input", "expected-fault", "unexpected"])
def test_a_failed_prediction_logs_one_line_and_no_server_detail(capsys, error, line):
    serving._patch_worker_tracebacks()
    _fail(error)
    err = capsys.readouterr().err
    assert err.strip() == line
    assert "Traceback" not in err and "/srv/secret" not in err


def test_any_other_failure_keeps_its_traceback_for_the_operator(capsys):
    serving._patch_worker_tracebacks()
    _fail(KeyError("a bug of ours"))
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug of ours" in err
