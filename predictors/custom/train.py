"""`train:` of the controlnet-custom image: a ControlNet trained on your pairs, returned as one file.

Cog (0.16.12, like the `cog train` CLI and Replicate) runs this when the server is started with
`--x-mode train` and a client POSTs /trainings; this signature is the training schema. The output
follows Replicate's trainable models: `weights` is a tar of the diffusers ControlNet folder (files at
its root: unpack it and `ControlNetModel.from_pretrained(folder)` loads it), which the custom image
serves when COG_WEIGHTS points at it; `validation_images` are [control map | sample] sheets from each
validation step.

These inputs are the trainer's own, not predict()'s, so they are defined here rather than in the
shared cog_base.Inputs registry (which exists to keep the predict schemas of all images identical).
Imported by the HTTP process for the schema: heavy imports happen inside train().
"""

import atexit
import os
import shutil
import tempfile
from typing import List, Optional

from cog import BaseModel, Input, Path

from cog_base.runtime import remove_on_worker_stop
from models import TRAINING_OUTPUTS as _last_output  # the previous training's files, removed when the next one starts

# Serving and training never download: the base comes from the local weights folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONDITION = "custom"
remove_on_worker_stop(lambda: list(_last_output))  # and when the server stops


class TrainingOutput(BaseModel):
    weights: Path
    validation_images: List[Path]


def train(
    pairs: Path = Input(
        description="A .zip or .tar holding images/<name> (targets), conditioning_images/<name> (control maps, "
        'same names) and prompts.jsonl ({"file_name": "<name>", "text": "<caption>"} per line) or prompts.csv '
        "(columns file_name,text)"
    ),
    max_train_steps: int = Input(description="Optimizer steps", default=1000, ge=0, le=200000),
    learning_rate: float = Input(description="AdamW learning rate (constant)", default=1e-5, ge=1e-8, le=1e-2),
    train_batch_size: int = Input(description="Pairs per micro-batch", default=4, ge=1, le=64),
    resolution: int = Input(
        description="Training size in pixels (a multiple of 64): every pair is resized (short side) and "
        "centre-cropped to it", default=512, ge=64, le=1024,
    ),
    gradient_accumulation_steps: int = Input(
        description="Micro-batches per optimizer step (effective batch = train_batch_size x this)", default=1, ge=1, le=64
    ),
    mixed_precision: str = Input(
        description="Precision of the frozen base and the autocast (CPU runs always use no)",
        choices=["fp16", "bf16", "no"], default="fp16",
    ),
    gradient_checkpointing: bool = Input(
        description="Trade ~30% speed for much less GPU memory (larger batches on small GPUs)", default=False
    ),
    seed: Optional[int] = Input(description="Seed; random when empty or 0. The seed used is logged", default=None,
                                ge=0, le=2147483647),
    validation_prompt: str = Input(
        description="Prompt(s) for the validation images, several separated by |; each is drawn on the next "
        "pair's control map. Empty: the first pair's caption", default="",
    ),
    validation_every: int = Input(
        description="Validate every this many steps (0: only after the last step)", default=250, ge=0
    ),
    init_from: str = Input(
        description='"base": a new ControlNet from the base UNet (ControlNet\'s zero-convolution start); or an '
        "http(s) URL or data: URI of an existing ControlNet (a weights tar this returns, or a zip of a diffusers "
        "folder) to fine-tune",
        default="base",
    ),
) -> TrainingOutput:
    import weights
    from models.train import TrainConfig, train_controlnet, write_tar
    from models.train_data import read_pairs

    config = TrainConfig(
        max_train_steps=max_train_steps, learning_rate=learning_rate, train_batch_size=train_batch_size,
        resolution=resolution, gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, seed=seed,
        validation_prompts=tuple(p.strip() for p in validation_prompt.split("|") if p.strip()),
        validation_every=validation_every,
    )
    config.check()
    for folder in _last_output:
        shutil.rmtree(folder, ignore_errors=True)
    _last_output.clear()
    # Cog reads the returned files after train() returns: they stay until the next training or exit.
    from models import critical

    # A cancel that landed between making the folder and recording it left it behind for good (an empty
    # controlnet-train-* folder after a cancel straight after the PUT): the two happen as one, the cancel after.
    with critical.section():
        out = Path(tempfile.mkdtemp(prefix="controlnet-train-"))
        _last_output.append(str(out))
    atexit.register(shutil.rmtree, str(out), ignore_errors=True)

    try:
        # The data is checked in full before any model loads: a bad archive costs seconds, not a GPU start.
        pair_list = read_pairs(pairs, out / "pairs", resolution, log=_log)
        found = weights.locate(CONDITION)
        if found.tiny:
            _log("WARNING: training on TINY RANDOM-WEIGHT models (no real base found): for testing only. "
                 f"Get the real base with `make weights COND={CONDITION}`.")
        init = None if init_from.strip() in ("", "base") else _fetch_controlnet(init_from.strip())
        result = train_controlnet(found.base, pair_list, out, config, init_from=init, log=_log)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(out / "pairs", ignore_errors=True)
    tar = write_tar(result.controlnet_dir, out / "controlnet-custom.tar")
    _log(f"Weights: {tar.name} ({tar.stat().st_size / 1e6:.1f} MB); serve them with COG_WEIGHTS=<its URL or path>")
    return TrainingOutput(weights=Path(tar), validation_images=[Path(p) for p in result.validation_images])


def _log(line: str) -> None:
    print(line, flush=True)


def _fetch_controlnet(source: str):
    """A URL or data: URI (a client's input names only what a client can reach: no server paths); a tar
    or zip becomes its folder, as COG_WEIGHTS does when serving."""
    from cog_base.predictor import asset_settings
    from models.assets import AssetCache, AssetError, fetch_client_weights

    if not source.startswith(("http://", "https://", "data:")):  # the same answer whether or not it exists
        raise ValueError('init_from must be "base", or an http(s) URL or data: URI of a ControlNet (e.g. the weights '
                         "tar a previous training returned); paths on the server are not accepted")
    try:
        folder = fetch_client_weights(source, AssetCache(**asset_settings()), "init_from")
    except AssetError as exc:
        raise ValueError(str(exc)) from None
    if not (Path(folder) / "config.json").is_file():
        raise ValueError("init_from must be \"base\" or a diffusers ControlNet (config.json + weights), e.g. the "
                         "weights tar a previous training returned")
    return folder
