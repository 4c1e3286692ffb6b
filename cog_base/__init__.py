from cog_base import runtime
from cog_base.inputs import Inputs
from cog_base.predictor import A_PROMPT, N_PROMPT, ControlNetPredictor, MultiControlNetPredictor, Version

# Inside the pinned Cog 0.16.x server this adjusts its HTTP process and worker (cog_base/cog016/); a
# newer Cog's server is left as it is.
runtime.install()

__all__ = ["A_PROMPT", "N_PROMPT", "ControlNetPredictor", "Inputs", "MultiControlNetPredictor", "Version"]
