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


def fit_to_state(network: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`network` (built on the meta device) with every parameter and buffer shaped as in `state`, then
    loaded from it. A depthwise convolution stays depthwise."""
    for path, module in network.named_modules():
        prefix = f"{path}." if path else ""
        own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        for name, tensor in own.items():
            shape = state[prefix + name].shape
            if tensor.shape == shape:
                continue
            empty = torch.empty(shape, dtype=tensor.dtype, device="meta")
            if name in module._parameters:
                module._parameters[name] = torch.nn.Parameter(empty, requires_grad=tensor.requires_grad)
            else:
                module._buffers[name] = empty
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            depthwise = module.groups > 1 and module.groups == module.in_channels
            module.out_channels = module.weight.shape[0]
            module.in_channels = module.weight.shape[1] * (module.out_channels if depthwise else module.groups)
            module.groups = module.out_channels if depthwise else module.groups
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.num_features = module.weight.shape[0]
    network.load_state_dict(state, assign=True)
    return network
