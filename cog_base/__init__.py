from cog_base.inputs import Inputs
from cog_base.predictor import A_PROMPT, N_PROMPT, ControlNetPredictor

__all__ = ["A_PROMPT", "N_PROMPT", "ControlNetPredictor", "Inputs"]
