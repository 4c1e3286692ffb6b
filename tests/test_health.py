"""A worker that cannot serve any more says so (/health-check UNHEALTHY, Kubernetes probe files); one
request's unexpected failure does not mark it."""

import pytest

from cog_base.health import WorkerHealth
from cog_base.predictor import UnexpectedError
from tests.conftest import drawing, predictor_class


def test_a_failed_self_test_marks_the_worker_and_a_success_clears_it(tmp_path):
    (tmp_path / "ready").touch()  # what Cog writes once setup succeeded
    lines = []
    health = WorkerHealth(probe_root=tmp_path, log=lines.append)

    def broken():
        raise RuntimeError("cannot initialize type")

    health.after_unexpected_failure(KeyError("x"), broken)
    with pytest.raises(RuntimeError, match="so did the worker's self-test .RuntimeError.; restart the server"):
        health.check()
    assert not (tmp_path / "ready").exists() and (tmp_path / "unhealthy").exists()
    health.succeeded()
    assert health.check() and (tmp_path / "ready").exists() and not (tmp_path / "unhealthy").exists()
    health.after_unexpected_failure(KeyError("x"), lambda: None)
    assert health.check() and lines[0].startswith("UNHEALTHY:")


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
