"""`make image-test` twice at once on one host: each run names what it creates for itself, serves the
wheelhouse on a port of its own, and a dockerd one of them started is stopped by the last one. Unit tests
(no Docker here): the choices that decide whether two runs collide."""

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from scripts import image_test


def test_two_runs_of_one_condition_name_everything_they_create_differently(tmp_path, monkeypatch):
    monkeypatch.setattr(image_test, "CACHE", tmp_path)
    first, second = image_test.run_names("canny"), image_test.run_names("canny")
    assert first.token != second.token
    assert len({first.tag, second.tag}) == len({first.container, second.container}) == 2
    assert first.context != second.context
    for names in (first, second):
        assert names.tag.startswith("controlnet-canny-smoke:")  # never a real image's tag
        assert names.context.parent == image_test.ROOT / "build"
    assert image_test.scratch("rootfs-") != image_test.scratch("rootfs-")


def test_two_wheelhouse_servers_run_side_by_side_on_ports_of_their_own(tmp_path):
    house = tmp_path / "wheels"
    house.mkdir()
    (house / "x-1.0-py3-none-any.whl").write_bytes(b"wheel")
    servers = [image_test.serve_wheelhouse(house), image_test.serve_wheelhouse(house)]
    try:
        ports = [server.server_address[1] for server in servers]
        assert ports[0] != ports[1]
        for port in ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/x-1.0-py3-none-any.whl", timeout=10) as answer:
                assert answer.read() == b"wheel"
            assert image_test.pip_options(port) == f"--no-index --find-links http://127.0.0.1:{port}/"
    finally:
        for server in servers:
            server.shutdown()
    assert not hasattr(image_test, "WHEEL_PORT")


def test_the_build_passes_the_dependency_images_own_pip_options(tmp_path, monkeypatch):
    """The pip layers' cache key holds PIP_OPTIONS: a later build reuses the recorded ones and serves nothing;
    a dependency image built on another base image (or without the labels) is rebuilt."""
    calls, labels = [], {}
    recorded = "--no-index --find-links http://127.0.0.1:40001/"

    def fake_run(cmd, **kw):
        calls.append(list(cmd))
        if list(cmd[:3]) == ["docker", "image", "inspect"]:
            out = labels.get(cmd[4].split('"')[1], "<no value>") if "Labels" in cmd[4] else "sha256:base-now"
            return subprocess.CompletedProcess(cmd, 0, stdout=out + "\n", stderr="")
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    served = []

    class Server:
        server_address = ("127.0.0.1", 40002)

        def shutdown(self):
            served.append("stopped")

    monkeypatch.setattr(image_test.subprocess, "run", fake_run)
    monkeypatch.setattr(image_test, "ensure_wheelhouse", lambda: tmp_path)
    monkeypatch.setattr(image_test, "serve_wheelhouse", lambda house: served.append("served") or Server())
    (tmp_path / "Dockerfile").write_text(f"FROM x\n{image_test.DEPS_END}\nCOPY . /src\n")
    (tmp_path / "requirements.txt").write_text("")
    labels.update({image_test.PIP_OPTIONS_LABEL: recorded, image_test.BASE_ID_LABEL: "sha256:base-now"})
    assert image_test.ensure_deps(tmp_path, "base") == recorded and served == []  # reused, nothing served
    image_test.docker_build(tmp_path, "t:1", "base", recorded)
    assert f"PIP_OPTIONS={recorded}" in calls[-1]
    labels[image_test.BASE_ID_LABEL] = "sha256:base-before"  # the base image was made again since
    rebuilt = image_test.ensure_deps(tmp_path, "base")
    assert rebuilt == image_test.pip_options(40002) and served == ["served", "stopped"]
    build = calls[-1]
    assert build[:2] == ["docker", "build"] and f"PIP_OPTIONS={rebuilt}" in build
    assert f"{image_test.PIP_OPTIONS_LABEL}={rebuilt}" in build and f"{image_test.BASE_ID_LABEL}=sha256:base-now" in build


def test_a_dockerd_started_by_one_run_is_stopped_by_the_last_run_using_it(tmp_path):
    # Stand-ins: a process whose argv[0] is dockerd; the run that started it; a second run (pid 1: alive).
    daemon = subprocess.Popen(["bash", "-c", "exec -a dockerd sleep 60"])
    starter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    second = 1
    try:
        for _ in range(50):
            if Path(f"/proc/{daemon.pid}/cmdline").read_bytes().startswith(b"dockerd"):
                break
            time.sleep(0.1)
        users = image_test.EngineUsers(tmp_path / "engine")
        users.join(starter.pid, started_daemon=daemon.pid)
        users.join(second)
        users.join(2**22 + 7)  # a run that died without leaving: not counted
        assert users.leave(starter.pid) is None  # the starter finishes first: dockerd stays up for the second
        assert users.leave(second) == daemon.pid  # the last one stops it
        image_test.stop_daemon(daemon.pid)
        assert daemon.wait(timeout=10) is not None
        # A dockerd no run here started (the host's own) is never returned.
        users.join(starter.pid)
        assert users.leave(starter.pid) is None
    finally:
        for process in (daemon, starter):
            process.kill()
            process.wait()
