"""`python -m weights.download COND`: fetch a condition's real weights into the weights root.

Only this module talks to the network; serving loads local folders only.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import socket
import sys
import urllib.parse
from pathlib import Path

import weights


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def check_reachable(url: str, what: str, timeout: float = 10.0) -> None:
    """Fail in seconds, not after the hub client's minutes of retries, and say what was tried."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        sys.exit(f"make weights: HF_HUB_OFFLINE is set, so {url} (for {what}) will not be contacted; unset it.")
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        sys.exit(
            f"make weights: cannot reach {parts.hostname}:{port} ({url}) to download {what}: {exc}.\n"
            "This step needs internet access (set HF_ENDPOINT to use a mirror, HF_TOKEN for gated repos).\n"
            "Offline, `make tiny-weights` writes tiny random models that let the server and tests run."
        )


def download_component(name: str, dest: Path) -> None:
    from huggingface_hub import snapshot_download

    spec = weights.MANIFEST["components"][name]
    if weights.is_complete(dest, name, tiny=False):
        print(f"{name}: already complete at {dest}")
        return
    if "from_unet" in spec:  # nothing to download: derived from the base fetched before it
        from models.train import write_untrained_controlnet

        print(f"{name}: an untrained ControlNet from {spec['from_unet']}'s UNet -> {dest}", flush=True)
        write_untrained_controlnet(weights.root() / spec["from_unet"], dest)
        weights.write_marker(dest, from_unet=spec["from_unet"], revision=weights.revision(name))
        print(f"{name}: complete", flush=True)
        return
    if spec.get("revision") is None:  # never a moving branch: the image serves its default version without it
        print(f"{name}: NOT downloaded: {spec['repo']} has no pinned revision in weights/manifest.json "
              f"({spec.get('unpinned', 'unpinned')}). Pin its commit id there to fetch it.", flush=True)
        return
    what = f"{spec['repo']}@{spec['revision'][:10]}"
    check_reachable(endpoint(), what)
    print(f"{name}: downloading {what} ({', '.join(spec['files'])}) -> {dest}", flush=True)
    snapshot_download(
        repo_id=spec["repo"], revision=spec["revision"], allow_patterns=spec["files"], local_dir=dest
    )
    got = [p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()]
    unmatched = [pat for pat in spec["files"] if not fnmatch.filter(got, pat)]
    if unmatched:
        sys.exit(f"{name}: {what} has no file matching {unmatched}; the manifest is wrong for this revision.")
    check_digests(name, what, dest, spec.get("sha256", {}))
    if "config" in spec:  # what a single file's converter needs beside it, offline
        import importlib

        module, _, function = spec["config"].partition(":")
        getattr(importlib.import_module(module), function)(dest)
    weights.write_marker(dest, repo=spec["repo"], revision=spec["revision"], files=spec["files"])
    print(f"{name}: complete", flush=True)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_digests(name: str, what: str, dest: Path, expected: dict[str, str]) -> None:
    """A file whose digest the manifest knows must have it: a mirror (HF_ENDPOINT) or a cache could serve
    other bytes under the same name. The folder then gets no completion marker, so nothing serves it."""
    wrong = [rel for rel, digest in expected.items() if sha256(dest / rel) != digest]
    if wrong:
        sys.exit(f"{name}: {', '.join(wrong)} from {what} do not have the manifest's sha256; delete {dest} and retry "
                 "(check HF_ENDPOINT if you use a mirror).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("condition", choices=weights.IMAGES)
    args = parser.parse_args(argv)
    for name in dict.fromkeys(weights.components(args.condition).values()):  # multi: MiDaS serves two conditions
        download_component(name, weights.root() / name)
    print(f"weights for {args.condition} are in {weights.root()}")


if __name__ == "__main__":
    main()
