from cog_base import serving
from cog_base.inputs import Inputs
from cog_base.predictor import A_PROMPT, N_PROMPT, ControlNetPredictor, MultiControlNetPredictor, Version

# Inside Cog's server this adjusts the HTTP process and the worker (see serving.py); elsewhere
# (tests, scripts) it only installs the worker's log shim, which nothing calls.
serving.install()

__all__ = ["A_PROMPT", "N_PROMPT", "ControlNetPredictor", "Inputs", "MultiControlNetPredictor", "Version"]
