"""`make image-test COND=x`: build the condition's real image with tiny weights, run it, predict, stop it.

The smoke image is `make image`'s own staged context with `CONTROLNET_WEIGHTS=tiny`, tagged
controlnet-<x>-smoke:<run>. With the cog CLI on PATH it is built by `cog build`; without it, by
`docker build` from the Dockerfile the staging generates. Offline from any container registry:
the base image is made here with debootstrap from the machine's Debian mirror, the packages come
from a wheelhouse downloaded once from PyPI on the host and served to the build on 127.0.0.1. All
traffic stays on loopback (`--network host` for the build, the container published on 127.0.0.1).

Two runs side by side on one host both work: each has its own names (tag, container, staged context,
debootstrap folder: `run_names`), its own free ports (the container's and the wheelhouse's), and a
dockerd started by one run is stopped by the last run still using it (`EngineUsers`). The wheelhouse
URL is in the pip layer's cache key, so the dependency image records the options it was built with
(a label) and every later build passes the same ones: its pip layers come from the cache, with no
wheelhouse served at all.

The built image carries `cog build`'s labels (run.cog.config, run.cog.openapi_schema, ...), checked
against the schema the running container serves. Installs what it needs (Debian's docker.io and
debootstrap, as root) and starts dockerd if none runs. Removes what it created (the container, the
smoke image unless --keep / KEEP=1, the staged context, a dockerd it started); keeps, for the next run, under the cache folder the wheelhouse and in Docker the base
image and the dependency image (`controlnet-cog-deps:<hash>`: the pip layers every condition
shares). `--purge` removes those too.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import hashlib
import http.server
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from scripts.build_image import DEPS_END, label_image
from scripts.cog_config import ROOT, field
from scripts.serve import port_number, require_port

CACHE = Path(os.environ.get("CONTROLNET_COG_CACHE", Path.home() / ".cache" / "controlnet-cog")) / "image-test"
# The dependency image's label holding the PIP_OPTIONS it was built with: the pip layers' cache key.
PIP_OPTIONS_LABEL = "org.controlnet-cog.pip-options"
BASE_ID_LABEL = "org.controlnet-cog.base-id"  # the base image it was built on
BUILD_ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}  # Debian's client has no buildx; the Dockerfile needs none
STOP_LIMIT_S = 10.0


def log(msg: str) -> None:
    print(f"image-test: {msg}", flush=True)


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def quiet(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


def apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise SystemExit(f"image-test: needs {' '.join(packages)}; install them (as root: apt-get install -y {' '.join(packages)})")
    log(f"installing {' '.join(packages)} (Debian packages)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-qq", env=env)
    run("apt-get", "install", "-y", "-qq", *packages, env=env, stdout=subprocess.DEVNULL)


@dataclass(frozen=True)
class RunNames:
    """What one run creates, named for that run alone, so that two runs (even of one condition) never
    remove, overwrite or stage into each other's."""

    token: str
    tag: str
    container: str
    context: Path


def run_names(condition: str, token: str | None = None) -> RunNames:
    token = token or f"{os.getpid()}-{secrets.token_hex(3)}"
    return RunNames(token, f"controlnet-{condition}-smoke:{token}", f"controlnet-{condition}-image-test-{token}",
                    ROOT / "build" / f"image-test-{condition}-{token}")


def scratch(prefix: str) -> Path:
    """A folder of this run's own under the cache (the debootstrap root, a partial download)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=CACHE))


class EngineUsers:
    """The image-test runs using a dockerd that one of them started. Each run registers its pid; the run
    that leaves last stops that dockerd (the one that started it may finish first, while another still
    builds). A dockerd nobody here started (the host's own) is never stopped."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder or CACHE / "engine"
        self.folder.mkdir(parents=True, exist_ok=True)

    def _locked(self):
        lock = open(self.folder / ".lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        return lock

    def join(self, pid: int, started_daemon: int | None = None) -> None:
        with self._locked():
            (self.folder / f"user-{pid}").touch()
            if started_daemon:
                (self.folder / "dockerd.pid").write_text(str(started_daemon))

    def leave(self, pid: int) -> int | None:
        """Unregister; returns the dockerd to stop when no other live run uses it, else None."""
        with self._locked():
            (self.folder / f"user-{pid}").unlink(missing_ok=True)
            alive = [user for user in self.folder.glob("user-*") if _alive(int(user.name.split("-", 1)[1]))]
            owned = self.folder / "dockerd.pid"
            if alive or not owned.exists():
                return None
            daemon = int(owned.read_text())
            owned.unlink()
            return daemon if _is_dockerd(daemon) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_dockerd(pid: int) -> bool:
    """Still that dockerd (a pid can be reused once it exited)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return Path(argv0.decode(errors="replace")).name == "dockerd"


def stop_daemon(pid: int) -> None:
    os.kill(pid, 15)
    for _ in range(300):
        if not _alive(pid):
            return
        try:  # our own child: reap it, else it stays a zombie and looks alive
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            pass
        time.sleep(0.1)


def ensure_engine() -> subprocess.Popen | None:
    """A running Docker engine; returns the dockerd this run started (EngineUsers stops it)."""
    if shutil.which("docker") and quiet("docker", "info"):
        return None
    if not shutil.which("dockerd"):
        apt_install("docker.io")
    CACHE.mkdir(parents=True, exist_ok=True)
    log("starting dockerd (overlay2)")
    daemon = subprocess.Popen(
        ["dockerd", "--storage-driver=overlay2"], stdout=open(CACHE / "dockerd.log", "ab"), stderr=subprocess.STDOUT
    )
    for _ in range(120):
        if quiet("docker", "info"):
            return daemon
        if daemon.poll() is not None:
            break
        time.sleep(0.5)
    raise SystemExit(f"image-test: dockerd did not start; see {CACHE / 'dockerd.log'}")


def debian_mirror() -> str:
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            for line in path.read_text().splitlines():
                words = line.split()
                if line.startswith("URIs:") and len(words) > 1 and "security" not in words[1]:
                    return words[1]
                if words[:1] == ["deb"] and "security" not in line:
                    return next(w for w in words[1:] if "://" in w)
        except (OSError, StopIteration):
            continue
    return "http://deb.debian.org/debian"


def ensure_base(python: str) -> str:
    """A Debian bookworm image with this Python, pip, `python` and tini, made without any registry."""
    tag = f"controlnet-cog-base:bookworm-py{python}"
    if quiet("docker", "image", "inspect", tag):
        return tag
    if not shutil.which("debootstrap"):
        apt_install("debootstrap")
    rootfs = scratch("rootfs-")
    log(f"making the base image {tag} with debootstrap (about a minute)")
    run("debootstrap", "--variant=minbase", f"--include=python{python},python3-pip,python-is-python3,tini,ca-certificates",
        "bookworm", str(rootfs), debian_mirror(), stdout=subprocess.DEVNULL)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run("docker", "import", "-", tag, stdin=tar.stdout, stdout=subprocess.DEVNULL)
    tar.wait()
    shutil.rmtree(rootfs)
    return tag


def requirements_key() -> str:
    return hashlib.sha256((ROOT / "requirements.txt").read_bytes()).hexdigest()[:12]


def ensure_wheelhouse() -> Path:
    house = CACHE / f"wheelhouse-{requirements_key()}"
    if house.is_dir():
        return house
    partial = scratch(house.name + ".partial-")
    log(f"downloading the pinned wheels from PyPI into {house} (~3 GB, once)")
    # The machine-wide pip config may add a CPU-only torch from a local folder: ignore it.
    env = {**os.environ, "PIP_CONFIG_FILE": "/dev/null", "PIP_FIND_LINKS": ""}
    run(sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
        "-r", str(ROOT / "requirements.txt"), "-d", str(partial), env=env)
    try:
        partial.rename(house)
    except OSError:  # another run finished the same download first
        shutil.rmtree(partial, ignore_errors=True)
    return house


def serve_wheelhouse(house: Path) -> http.server.ThreadingHTTPServer:
    """On a free port of 127.0.0.1 (server.server_address[1])."""
    handler = functools.partial(_QuietHandler, directory=str(house))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def pip_options(port: int) -> str:
    return f"--no-index --find-links http://127.0.0.1:{port}/"


def docker_build(context: Path, tag: str, base: str, options: str, labels: dict | None = None) -> None:
    args = ["docker", "build", "-q", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
            "--build-arg", f"PIP_OPTIONS={options}", "-t", tag]
    for key, value in (labels or {}).items():
        args += ["--label", f"{key}={value}"]
    run(*args, str(context), env=BUILD_ENV, stdout=subprocess.DEVNULL)


def _label(image: str, key: str) -> str | None:
    inspected = subprocess.run(["docker", "image", "inspect", "-f", f'{{{{index .Config.Labels "{key}"}}}}', image],
                               capture_output=True, text=True)
    value = inspected.stdout.strip()
    return value if inspected.returncode == 0 and value not in ("", "<no value>") else None


def _image_id(image: str) -> str:
    return subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", image], capture_output=True, text=True).stdout.strip()


def ensure_deps(context: Path, base: str) -> str:
    """The shared dependency layers, tagged so that removing a condition's image keeps them; returns the
    PIP_OPTIONS they were built with, which a build must pass again to take them from the cache. Rebuilt
    when the base image changed since (a build on another base would miss the cache, and no wheelhouse
    is served to it)."""
    tag = f"controlnet-cog-deps:{requirements_key()}"
    options, base_id = _label(tag, PIP_OPTIONS_LABEL), _image_id(base)
    if options and _label(tag, BASE_ID_LABEL) == base_id:
        return options
    server = serve_wheelhouse(ensure_wheelhouse())
    options = pip_options(server.server_address[1])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            head = (context / "Dockerfile").read_text().split(DEPS_END)[0]
            (Path(tmp) / "Dockerfile").write_text(head)
            shutil.copy2(context / "requirements.txt", Path(tmp) / "requirements.txt")
            started = time.monotonic()
            docker_build(Path(tmp), tag, base, options, labels={PIP_OPTIONS_LABEL: options, BASE_ID_LABEL: base_id})
            log(f"dependency layers {tag}: {time.monotonic() - started:.0f} s (cached after the first build)")
    finally:
        server.shutdown()
    return options


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 10.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_ready(port: int, container: str, limit_s: float = 600) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        try:
            status = http_json(f"http://127.0.0.1:{port}/health-check", timeout=2).get("status")
        except OSError:
            status = None
        if status == "READY":
            return time.monotonic() - started
        if status == "SETUP_FAILED" or not quiet("docker", "top", container):
            break
        time.sleep(0.5)
    logs = subprocess.run(["docker", "logs", "--tail", "40", container], capture_output=True, text=True)
    raise SystemExit(f"image-test: {container} never became READY:\n{logs.stdout}{logs.stderr}")


def sample_image() -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (320, 256), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((60, 90, 260, 220), outline="black", width=4)
    draw.polygon([(50, 95), (160, 30), (270, 95)], outline="black", width=4)
    # A transparent corner: the inpaint image's mask (every other image composites it away).
    draw.rectangle((0, 0, 40, 40), fill=(0, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_inputs(condition: str) -> dict:
    """Where the sample image goes: `image`, or the first unit of an image of several conditions (multi)."""
    import weights

    if condition in weights.COMBINED:
        return {"controlnet_1": weights.COMBINED[condition][0], "controlnet_1_image": sample_image()}
    return {"image": sample_image()}


def small_request(port: int) -> dict:
    """Two steps at 256 px, in the served schema's terms: an SD 1.5 image's (image_resolution, ddim_steps) or
    another family's (num_inference_steps, an exact width: the 320x256 upload's aspect gives 256 px high)."""
    served = http_json(f"http://127.0.0.1:{port}/openapi.json")["components"]["schemas"]["Input"]["properties"]
    if "ddim_steps" in served:
        return {"image_resolution": "256", "ddim_steps": 2}
    return {"num_inference_steps": 2, "width": 320}


def predict(port: int, condition: str = "canny") -> tuple[float, list]:
    from PIL import Image

    body = {"input": {**image_inputs(condition), "prompt": "a house", "seed": 7, "num_samples": "1",
                      **small_request(port)}}
    started = time.monotonic()
    answer = http_json(f"http://127.0.0.1:{port}/predictions", body, timeout=600)
    elapsed = time.monotonic() - started
    if answer.get("status") != "succeeded":
        raise SystemExit(f"image-test: prediction {answer.get('status')}: {answer.get('error')}\n{answer.get('logs')}")
    images = [Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) for uri in answer["output"]]
    sizes = [image.size for image in images]
    # The control map first, then one sample, both at the planned size (short side 256, aspect kept).
    if len(images) != 2 or sizes[0] != sizes[1] or min(sizes[0]) != 256 or sizes[0][0] <= sizes[0][1]:
        raise SystemExit(f"image-test: expected a map and one sample of the same 256-px landscape size, got {sizes}")
    if "Using seed: 7" not in answer.get("logs", ""):
        raise SystemExit("image-test: the prediction's logs do not report the seed")
    return elapsed, sizes


def check_labels(tag: str, port: int) -> None:
    """What `docker inspect`, `cog predict IMAGE` and Replicate's tooling read: cog build's labels, with
    the schema the running container serves."""
    labels = json.loads(subprocess.run(["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", tag],
                                       capture_output=True, text=True, check=True).stdout)
    missing = [k for k in ("run.cog.config", "run.cog.version", "run.cog.openapi_schema", "org.opencontainers.image.licenses")
               if not labels.get(k)]
    if missing:
        raise SystemExit(f"image-test: {tag} lacks the labels {', '.join(missing)}")
    served = http_json(f"http://127.0.0.1:{port}/openapi.json")["components"]["schemas"]["Input"]["properties"]
    labelled = json.loads(labels["run.cog.openapi_schema"])["components"]["schemas"]["Input"]["properties"]
    if labelled != served:
        raise SystemExit(f"image-test: run.cog.openapi_schema of {tag} is not the schema the container serves")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("condition")
    parser.add_argument("--purge", action="store_true", help="also remove the cached base and dependency images")
    parser.add_argument("--port", type=port_number, default=None, help="publish the container on 127.0.0.1:PORT (default: a free port)")
    parser.add_argument("--keep", action="store_true", help="keep the image (KEEP=1) and print how to run it")
    args = parser.parse_args(argv)
    cond = args.condition
    if args.port:
        require_port(args.port, who="make image-test")
    names = run_names(cond)
    tag, container, context = names.tag, names.container, names.context
    figures: dict[str, object] = {"condition": cond}
    daemon = ensure_engine()
    users = EngineUsers()
    users.join(os.getpid(), daemon.pid if daemon else None)
    try:
        run(sys.executable, "-m", "scripts.build_image", cond, "--weights", "tiny", "--stage-only",
            "--context", str(context), cwd=ROOT, stdout=subprocess.DEVNULL)
        started = time.monotonic()
        if shutil.which("cog"):
            figures["path"] = "cog build"
            run("cog", "build", "-t", tag, cwd=context)
        else:
            figures["path"] = "docker build (generated Dockerfile)"
            base = ensure_base(field(cond, "python_version"))
            options = ensure_deps(context, base)
            started = time.monotonic()
            docker_build(context, tag, base, options)
            label_image(tag, cond, tiny=True, env=BUILD_ENV)
        figures["build_s"] = round(time.monotonic() - started, 1)
        figures["image_gb"] = round(int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", tag],
                                                       capture_output=True, text=True, check=True).stdout) / 1e9, 2)
        log(f"built {tag} via {figures['path']} in {figures['build_s']} s, {figures['image_gb']} GB")
        port = args.port or free_port()
        run("docker", "run", "-d", "--name", container, "-p", f"127.0.0.1:{port}:5000", tag, stdout=subprocess.DEVNULL)
        figures["ready_s"] = round(wait_ready(port, container), 1)
        log(f"READY after {figures['ready_s']} s")
        check_labels(tag, port)
        log("labels: run.cog.config, run.cog.version and run.cog.openapi_schema (the served schema) are there")
        figures["predict_s"], figures["sizes"] = predict(port, args.condition)
        figures["predict_s"] = round(figures["predict_s"], 1)
        log(f"prediction: map + sample {figures['sizes'][0]} in {figures['predict_s']} s")
        started = time.monotonic()
        run("docker", "stop", "-t", str(int(STOP_LIMIT_S)), container, stdout=subprocess.DEVNULL)
        figures["stop_s"] = round(time.monotonic() - started, 1)
        code = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", container],
                              capture_output=True, text=True).stdout.strip()
        if code != "0" or figures["stop_s"] >= STOP_LIMIT_S:
            raise SystemExit(f"image-test: docker stop took {figures['stop_s']} s, exit code {code} (want < 10 s, 0)")
        log(f"docker stop: {figures['stop_s']} s, exit code 0")
        print(json.dumps(figures), flush=True)
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
        if args.keep and "stop_s" in figures:
            log(f"kept the image {tag}. Run it:\n"
                f"  docker run -p 127.0.0.1:5000:5000 {tag}        (add --gpus all on a GPU host)\n"
                f"  cog predict {tag} -i image=@photo.png -i prompt='a house'   (with the cog CLI)\n"
                f"  docker inspect {tag}   (its labels: run.cog.config, run.cog.openapi_schema, ...)\n"
                f"  docker rmi {tag}       (remove it; the dependency layers stay cached)"
                + ("\n  (dockerd was started by this run and is stopped at its end unless another image-test still uses "
                   "it: start it again first)" if daemon else ""))
        else:
            subprocess.run(["docker", "rmi", tag], capture_output=True)
        shutil.rmtree(context, ignore_errors=True)
        if args.purge:
            subprocess.run(["docker", "rmi", f"controlnet-cog-deps:{requirements_key()}",
                            f"controlnet-cog-base:bookworm-py{field(cond, 'python_version')}"], capture_output=True)
        last = users.leave(os.getpid())
        if last:
            stop_daemon(last)
        elif daemon:
            log("dockerd started by this run stays up: another image-test is using it (the last one stops it)")


if __name__ == "__main__":
    main()
