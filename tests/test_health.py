"""A worker that cannot serve any more says so (/health-check UNHEALTHY, Kubernetes probe files); one
request's unexpected failure does not mark it."""

import io
import multiprocessing

import pytest

from cog_base.cog016 import serving
from cog_base.health import WorkerHealth
from cog_base.predictor import UnexpectedError
from tests.conftest import drawing, predictor_class


def test_a_failed_self_test_marks_the_worker_and_a_success_clears_it(tmp_path):
    (tmp_path / "ready").touch()  # what Cog writes once setup succeeded
    lines = []
    health = WorkerHealth(probe_root=tmp_path, log=lines.append)

    def broken():
        raise RuntimeError("cannot initialize type")

    health.after_unexpected_failure(KeyError("x"), {"canny": broken, "depth": lambda: None})
    with pytest.raises(RuntimeError, match="^canny: .*so did the worker's self-test .RuntimeError.; restart the server$"):
        health.check()
    assert not (tmp_path / "ready").exists() and (tmp_path / "unhealthy").exists()
    health.succeeded(["depth"])  # another condition working says nothing about canny
    with pytest.raises(RuntimeError, match="^canny: "):
        health.check()
    health.succeeded(["canny"])
    assert health.check() and (tmp_path / "ready").exists() and not (tmp_path / "unhealthy").exists()
    health.after_unexpected_failure(KeyError("x"), {"canny": lambda: None})
    assert health.check() and lines[0].startswith("UNHEALTHY: canny:")


@pytest.fixture(scope="module")
def canny():
    p = predictor_class("canny")()
    p.setup()
    return p


def _inputs(tmp_path):
    path = tmp_path / "in.png"
    drawing().save(path)
    return dict(image=path, prompt="a house", image_resolution="256", ddim_steps=1, seed=3)


def test_a_worker_that_fails_every_run_becomes_unhealthy_and_recovers(canny, tmp_path, monkeypatch):
    real = canny.runner.generate
    monkeypatch.setattr(canny.runner, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error")))
    with pytest.raises(UnexpectedError):
        canny.predict_with(_inputs(tmp_path))
    with pytest.raises(RuntimeError, match="restart the server"):
        canny.healthcheck()
    monkeypatch.setattr(canny.runner, "generate", real)
    assert len(canny.predict_with(_inputs(tmp_path))) == 2
    assert canny.healthcheck() is True


def test_one_requests_unexpected_failure_leaves_the_worker_healthy(canny, tmp_path, monkeypatch):
    real, calls = canny.runner.generate, []

    def first_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("something only this request triggers")
        return real(*args, **kwargs)

    monkeypatch.setattr(canny.runner, "generate", first_fails)
    with pytest.raises(UnexpectedError):
        canny.predict_with(_inputs(tmp_path))
    assert len(calls) == 2  # the self-test ran
    assert canny.healthcheck() is True


@pytest.mark.parametrize("condition", ["inpaint", "multi"])
def test_the_self_test_runs_on_images_with_other_inputs(condition):
    p = predictor_class(condition)()
    p.setup()
    p._self_test()  # raises if this image's warm-up inputs do not make a valid request
    assert p.healthcheck() is True


def _failing_for(p, broken):
    """The pipeline's generate, failing (as a broken CUDA state would) whenever a unit uses a Condition
    that `broken(condition)` picks."""
    real = p.runner.generate

    def generate(units, request):
        if any(broken(unit.condition) for unit in units):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(units, request)

    return generate


def test_a_broken_11_controlnet_stays_unhealthy_until_it_works_again(tmp_path, monkeypatch):
    """On a 1.0 image whose 1.1 ControlNet is broken, the self-test tries 1.1 (it tried the default only),
    the state names it, and a 1.0 success does not clear it."""
    p = predictor_class("hough")()
    p.setup()
    v11 = p.versioned[("hough", "1.1")]
    real = p.runner.generate
    monkeypatch.setattr(p.runner, "generate", _failing_for(p, lambda condition: condition is v11))
    with pytest.raises(UnexpectedError):
        p.predict_with({**_inputs(tmp_path), "controlnet_version": "1.1"})
    with pytest.raises(RuntimeError, match="^hough ControlNet 1.1: .*restart the server"):
        p.healthcheck()
    assert len(p.predict_with(_inputs(tmp_path))) == 2  # 1.0 serves
    with pytest.raises(RuntimeError, match="^hough ControlNet 1.1: "):
        p.healthcheck()
    monkeypatch.setattr(p.runner, "generate", real)
    assert len(p.predict_with({**_inputs(tmp_path), "controlnet_version": "1.1"})) == 2
    assert p.healthcheck() is True


def test_multi_names_the_broken_condition_and_keeps_it(tmp_path, monkeypatch):
    """The self-test tries every condition of the failed request; a success on another one leaves the
    broken one marked."""
    p = predictor_class("multi")()
    p.setup()
    real = p.runner.generate
    monkeypatch.setattr(p.runner, "generate", _failing_for(p, lambda condition: condition.name == "hed"))
    path = tmp_path / "in.png"
    drawing().save(path)
    both = dict(prompt="a house", image_resolution="256", ddim_steps=1, seed=3, controlnet_1="canny",
                controlnet_1_image=path, controlnet_2="hed", controlnet_2_image=path)
    with pytest.raises(UnexpectedError):
        p.predict_with(both)
    with pytest.raises(RuntimeError, match="^hed: .*restart the server") as broken:
        p.healthcheck()
    assert "canny" not in str(broken.value)  # its self-test passed
    assert len(p.predict_with({**both, "controlnet_2": "none", "controlnet_2_image": None})) == 2  # canny alone
    with pytest.raises(RuntimeError, match="^hed: "):
        p.healthcheck()
    monkeypatch.setattr(p.runner, "generate", real)
    assert len(p.predict_with(both)) == 3
    assert p.healthcheck() is True


def test_the_health_verdicts_stay_out_of_a_clients_logs(canny, tmp_path, monkeypatch, capsys):
    """In Cog's worker, stdout and stderr are the prediction's logs: "UNHEALTHY ... restart the server" is
    the operator's, written to the server's own stream only."""
    server = io.StringIO()
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())  # as in Cog's worker
    monkeypatch.setattr(serving, "_server_stream", lambda: server)
    monkeypatch.setattr(canny.runner, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error")))
    with pytest.raises(UnexpectedError):
        canny.predict_with(_inputs(tmp_path))
    client = capsys.readouterr()
    assert "restart" not in client.out + client.err and "UNHEALTHY" not in client.out + client.err
    assert "UNHEALTHY: canny: " in server.getvalue() and "restart the server" in server.getvalue()
    monkeypatch.undo()
    canny.health.problems.clear()
