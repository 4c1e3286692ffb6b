"""One module per detector. Each is a plain callable: `detector(rgb_uint8, **options) -> HxWx3 uint8 map`.

Networks are injected through the constructor (tests pass tiny random ones); `from_weights(folder)`
loads the real ones from a local folder and never reaches the network.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models import default_device


def require_files(folder: Path | None, files, condition: str) -> Path:
    """The folder, once every file the detector loads is there; else an error that says how to get them."""
    folder = Path(folder) if folder is not None else None
    missing = [name for name in files if folder is None or not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} not found in {folder}; run `make weights COND={condition}` "
            "(or `make tiny-weights` for random ones)"
        )
    return folder


def load_transformers(folder: Path | None, model_class, processor_class, files, condition: str):
    """A transformers model and its image processor from a local folder, in fp32 on the best device."""
    folder = require_files(folder, files, condition)
    model = model_class.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    processor = processor_class.from_pretrained(folder, local_files_only=True)
    return model.to(default_device()), processor
