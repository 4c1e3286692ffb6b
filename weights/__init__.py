"""Where each condition's weights live, and the one error that says how to get them.

Layout under the weights root (default: this folder; `CONTROLNET_WEIGHTS_DIR` overrides it):
    <component>/...          real weights from `make weights COND=<cond>`
    tiny/<component>/...     tiny random weights from `make tiny-weights`, same layout
A component folder counts only once its `.complete.json` marker is written, so an interrupted
download is never mistaken for a usable one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = json.loads((HERE / "manifest.json").read_text())
CONDITIONS: tuple[str, ...] = tuple(MANIFEST["conditions"])
# Images that serve several conditions (each a ControlNet unit of a request): name -> its conditions.
COMBINED: dict[str, tuple[str, ...]] = {name: tuple(conds) for name, conds in MANIFEST.get("combined", {}).items()}
# Images of another model family (not SD 1.5): name -> its base, its ControlNet and the conditions whose
# detectors make its control maps (one ControlNet reads every condition's map: a union model).
FAMILIES: dict[str, dict] = MANIFEST.get("families", {})
# Every image this repo builds: one per condition, then the combined ones, then the other families'.
IMAGES: tuple[str, ...] = CONDITIONS + tuple(COMBINED) + tuple(FAMILIES)
MARKER = ".complete.json"
VERSION_MARK = "@"  # a role of another ControlNet version than the image's default: controlnet@1.1
TINY = "tiny"
# Bumped whenever weights/tiny.py writes something different (2: word-level tokenizer; 3: pose's hand and
# face networks; 4: the 1.1 seg ControlNet as the fp16 file its pinned download is; 5: Z-Image's transformer with
# positions for 2048 px, the largest width/height), so tiny weights written by an older generator are rewritten
# instead of loaded.
TINY_GENERATOR = 5


class MissingWeightsError(RuntimeError):
    pass


def root() -> Path:
    return Path(os.environ.get("CONTROLNET_WEIGHTS_DIR", HERE)).resolve()


def conditions_of(image: str) -> tuple[str, ...]:
    """The conditions an image serves: its own, or a combined image's list."""
    if image in COMBINED:
        return COMBINED[image]
    if image in FAMILIES:
        return tuple(FAMILIES[image]["conditions"])
    if image not in MANIFEST["conditions"]:
        raise ValueError(f"unknown condition {image!r}; known: {', '.join(IMAGES)}")
    return (image,)


def components(condition: str) -> dict[str, str]:
    """Role -> component name (base, controlnet and, for conditions that have one, detector). A
    combined image's roles are `<condition>.controlnet` / `<condition>.detector` beside the one base."""
    if condition in COMBINED:
        roles = {"base": components(COMBINED[condition][0])["base"]}
        for cond in COMBINED[condition]:
            # Each unit runs its condition's default version: another version's components would be dead weight.
            roles.update({f"{cond}.{role}": name for role, name in components(cond).items()
                          if role != "base" and not version_of(role)})
        return roles
    if condition in FAMILIES:
        family = FAMILIES[condition]
        roles = {"base": family["base"], "controlnet": family["controlnet"]}
        for cond in family["conditions"]:  # each condition's detector, at its default version
            detector = MANIFEST["conditions"][cond].get("detector")
            if detector:
                roles[f"{cond}.detector"] = detector
        return roles
    conditions_of(condition)  # an unknown name is an error that lists the known ones
    return {role: name for role, name in MANIFEST["conditions"][condition].items() if name}


def version_of(role: str) -> str | None:
    """The ControlNet version a role belongs to (`controlnet@1.1` -> "1.1"); None for the default version's."""
    return role.partition(VERSION_MARK)[2] or None


def marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_marker(folder: Path, **info) -> None:
    (folder / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def revision(name: str) -> str:
    """The pinned revision; a component derived from a base (`from_unet`) follows that base's."""
    spec = MANIFEST["components"][name]
    return revision(spec["from_unet"]) if "from_unet" in spec else spec["revision"]  # None: unpinned


def is_complete(folder: Path, name: str, tiny: bool) -> bool:
    info = marker(folder)
    if info is None:
        return False
    if tiny:
        return info.get("tiny") is True and info.get("generator") == TINY_GENERATOR
    # A download of another revision, or of other files (pose's hand and face files came later), is stale:
    # the manifest is the source of truth.
    files = MANIFEST["components"][name].get("files")
    return info.get("revision") == revision(name) and info.get("files", files) == files


@dataclass(frozen=True)
class WeightSet:
    condition: str
    tiny: bool
    folders: dict[str, Path]  # role -> folder

    @property
    def base(self) -> Path:
        return self.folders["base"]

    @property
    def controlnet(self) -> Path:
        return self.folders["controlnet"]

    @property
    def detector(self) -> Path | None:
        return self.folders.get("detector")

    def of(self, condition: str) -> "WeightSet":
        """One condition's folders (base, controlnet, detector): itself for a single-condition image."""
        if condition == self.condition:
            return self
        prefix = f"{condition}."
        own = {role[len(prefix):]: folder for role, folder in self.folders.items() if role.startswith(prefix)}
        if not own and condition not in FAMILIES.get(self.condition, {}).get("conditions", ()):
            raise ValueError(f"{self.condition} serves no condition {condition!r}")
        return WeightSet(condition, self.tiny, {"base": self.base, **own})


def _folders(condition: str, tiny: bool) -> dict[str, Path] | None:
    """Every default-version folder complete, or None; another version's folders only where complete (weights
    made before that version was added, or a component without a pinned revision, still serve the default)."""
    base = root() / TINY if tiny else root()
    names = components(condition)
    folders = {role: base / name for role, name in names.items()}
    complete = {role: is_complete(folder, names[role], tiny) for role, folder in folders.items()}
    if all(done for role, done in complete.items() if not version_of(role)):
        return {role: folder for role, folder in folders.items() if complete[role]}
    return None


def locate(condition: str, prefer: str | None = None) -> WeightSet:
    """Real weights when complete, else the tiny ones. `prefer` (or CONTROLNET_WEIGHTS) = real|tiny|auto."""
    prefer = prefer or os.environ.get("CONTROLNET_WEIGHTS", "auto")
    if prefer not in ("real", "tiny", "auto"):
        raise ValueError(f"CONTROLNET_WEIGHTS must be real, tiny or auto, not {prefer!r}")
    order = {"real": [False], "tiny": [True], "auto": [False, True]}[prefer]
    for tiny in order:
        folders = _folders(condition, tiny)
        if folders is not None:
            return WeightSet(condition, tiny, folders)
    required = [name for role, name in components(condition).items() if not version_of(role)]
    missing = ", ".join(
        str(root() / name) for name in dict.fromkeys(required) if not is_complete(root() / name, name, False)
    )
    fixes = {
        "real": f"`make weights COND={condition}` (downloads the real weights; needs internet)",
        "tiny": "`make tiny-weights` (tiny random weights for tests; offline)",
    }
    wanted = [fixes[p] for p in ("real", "tiny") if p == prefer or prefer == "auto"]
    raise MissingWeightsError(
        f"no complete {'' if prefer == 'auto' else prefer + ' '}weights for condition {condition!r} "
        f"(missing or incomplete: {missing}). Run " + " or ".join(wanted) + "."
    )
