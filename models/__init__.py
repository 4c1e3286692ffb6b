"""Model code: detectors, image helpers and the SD 1.5 + ControlNet pipeline. Knows nothing of Cog."""

from models import quiet  # noqa: F401  first, so the third-party imports below any of this start quiet


def default_device() -> str:
    import torch  # here, so that models.image stays importable without torch's start-up cost

    return "cuda" if torch.cuda.is_available() else "cpu"


# The custom image's last training outputs (predictors/custom/train.py), removed when the next training starts
# or the worker stops. Kept here, in a module imported once per process: a list in the train module itself
# forgot a finished training's folder when that file was imported again in the same worker (a fresh module,
# a fresh list), and the folder stayed behind for good.
TRAINING_OUTPUTS: list[str] = []
