"""Model code: detectors, image helpers and the SD 1.5 + ControlNet pipeline. Knows nothing of Cog."""

from models import quiet  # noqa: F401  first, so the third-party imports below any of this start quiet


def default_device() -> str:
    import torch  # here, so that models.image stays importable without torch's start-up cost

    return "cuda" if torch.cuda.is_available() else "cpu"
