"""Known third-party noise, filtered at its source: each entry names the message and the module.

Imported by `models/__init__.py`, so the server (the predictor imports models before anything
heavy) and `python -m weights.tiny` both start quiet. Every filter is narrow: a warning or log line
from any other module, ours included, still shows. Nothing here hides an error.
"""

from __future__ import annotations

import logging
import re
import warnings

# (message regex, module regex, category): the `module` is the module that calls warnings.warn.
WARNINGS = (
    # controlnet_aux imports every detector it ships; we use none that needs mediapipe.
    (r"The module 'mediapipe' is not installed", r"controlnet_aux\.", UserWarning),
    # controlnet_aux's segment_anything registers TinyViT names timm already has (not used here).
    (r"Overwriting tiny_vit_\w+ in registry", r"controlnet_aux\.", UserWarning),
    # controlnet_aux still imports timm's old module paths.
    (r"Importing from timm\.models\.(layers|registry) is deprecated", r"timm\.", FutureWarning),
)

# logger name -> message regexes dropped from it.
LOG_LINES = {
    # The tiny weights are written in fp16 with .to(); they have no fp32-only modules ([]).
    "diffusers.models.modeling_utils": (r"There are modules in \w+ that should be kept in float32: \[\]",),
    # models.prompt says it once, in words, with the count for the text encoder that matters.
    "transformers.tokenization_utils_base": (r"Token indices sequence length is longer than",),
    "diffusers.pipelines.controlnet.pipeline_controlnet": (r"The following part of your input was truncated",),
}


class DropMessages(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def no_weight_loading_bar() -> None:
    """transformers 5 draws a tqdm "Loading weights" bar for every model it loads (the text encoder, seg's
    UperNet): two lines in every server's start-up that say nothing the setup line does not. Called
    by the loaders, which import transformers anyway; any other bar of transformers still shows."""
    from transformers.utils import logging as hf_logging

    def hook(factory, args, kwargs):
        return factory(*args, **({**kwargs, "disable": True} if kwargs.get("desc") == "Loading weights" else kwargs))

    hf_logging.set_tqdm_hook(hook)


def install() -> None:
    for message, module, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, patterns in LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(patterns))


install()
