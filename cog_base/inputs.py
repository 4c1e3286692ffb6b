"""Every input any condition image serves, defined once (the pattern of replicate/cog-flux).

A predictor's literal signature refers to these: `prompt: str = Inputs.prompt`. Cog's runtime
reads the `Input(...)` objects as the parameters' defaults, and Cog's static schema parser (`cog
build`) resolves the class attribute, so each served schema is built from this one definition.
Values stay literal here because that parser reads literals, not module constants.

The first group and its defaults are jagilley/controlnet-*'s, so their clients switch unchanged;
every input after it is optional, and its default reproduces the jagilley behaviour exactly.
Only cog and the standard-library-only models.request are imported: the HTTP process imports the
predictor module just to read its schema.
"""

from cog import Input

from models.request import InputSpec


class Inputs:
    # -- jagilley/controlnet-*, in their order -------------------------------------------------
    image = Input(description="Input image (URL or data: URI)")
    prompt = Input(description="Prompt for the model")
    num_samples = Input(description="Number of samples (higher values may OOM)", choices=["1", "4"], default="1")
    image_resolution = Input(
        description="Resolution of image, short side (aspect kept, sides rounded to multiples of 64)",
        choices=["256", "512", "768"], default="512",
    )
    ddim_steps = Input(description="Steps", default=20, ge=1, le=100)
    scale = Input(description="Scale for classifier-free guidance", default=9.0, ge=0.1, le=30.0)
    seed = Input(
        description="Seed; random when empty, 0 or -1 (as the originals). The seed used is printed in the logs",
        default=None, ge=-1, le=4294967295,
    )
    eta = Input(description="DDIM eta: the amount of noise added at each denoising step", default=0.0, ge=0.0, le=1.0)
    a_prompt = Input(description="Additional text appended to the prompt", default="best quality, extremely detailed")
    n_prompt = Input(
        description="Negative prompt",
        default="longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality",
    )

    # -- per-condition detector options (a condition lists the ones it takes) -----------------
    detect_resolution = Input(description="Resolution at which the detector runs (short side)", default=512, ge=128, le=1024)
    low_threshold = Input(description="Canny low threshold", default=100, ge=1, le=255)
    high_threshold = Input(description="Canny high threshold", default=200, ge=1, le=255)
    value_threshold = Input(description="M-LSD value threshold: higher finds fewer lines", default=0.1, ge=0.01, le=2.0)
    distance_threshold = Input(description="M-LSD distance threshold: shorter lines are dropped", default=0.1, ge=0.01, le=20.0)
    bg_threshold = Input(
        description="Normalised depth below which a pixel is background (flat normal)", default=0.0, ge=0.0, le=1.0
    )
    # ControlNet 1.1's preprocessor choices (the first is its demo's default).
    lineart_preprocessor = Input(
        description="Line art detector: realistic (detailed lines) or coarse (fewer, bolder lines)",
        choices=["realistic", "coarse"], default="realistic",
    )
    softedge_preprocessor = Input(
        description="Soft edge detector: PiDiNet or HED; the _safe variants quantise edge strength, hiding faint gradients",
        choices=["pidinet", "pidinet_safe", "hed", "hed_safe"], default="pidinet",
    )
    # OpenPose's hand and face networks (controlnet_aux's include_hand / include_face); off keeps 1.0's body-only map.
    pose_hands_face = Input(
        description="Also detect hands and face and draw them on the map (ControlNet 1.1 was trained with them); "
        "off: the body only, as ControlNet 1.0",
        default=False,
    )
    # The images that served a ControlNet 1.0 model carry its 1.1 retraining too (and 1.1's detector where it changed).
    controlnet_version = Input(
        description="ControlNet model: 1.0 (jagilley's, unchanged) or 1.1 (lllyasviel's retrained model, with 1.1's "
        "detector where it differs)",
        choices=["1.0", "1.1"], default="1.0",
    )
    # The published jagilley/controlnet-hed names its image `input_image`; that image takes either.
    image_or_input_image = Input(description="Input image (URL or data: URI); or send it as input_image", default=None)
    input_image = Input(description="Same as image (the name jagilley/controlnet-hed clients send)", default=None)

    # -- controls diffusers, ControlNet 1.1 and A1111 have (every image) -------------------------
    controlnet_conditioning_scale = Input(
        description="Control strength: how strongly the control map steers the image (0 = not at all)",
        default=1.0, ge=0.0, le=2.0,
    )
    guess_mode = Input(
        description="Guess mode: the ControlNet steers only the prompted branch and recognises the content "
        "without a prompt; use a low scale (3-5)",
        default=False,
    )
    control_guidance_start = Input(
        description="Fraction of the steps after which the ControlNet starts acting", default=0.0, ge=0.0, le=1.0
    )
    control_guidance_end = Input(
        description="Fraction of the steps after which the ControlNet stops acting (must exceed the start)",
        default=1.0, ge=0.0, le=1.0,
    )
    scheduler = Input(
        description="Sampler. DDIM is ControlNet 1.0's (eta applies to DDIM only); UniPC and DPM++ reach "
        "similar quality in fewer steps",
        choices=["DDIM", "UniPC", "DPM++ 2M", "DPM++ 2M Karras", "Euler a"], default="DDIM",
    )
    control_image_is_map = Input(
        description="The image already is a control map for this condition: skip the detector", default=False
    )
    return_control_map = Input(description="Return the control map as the first output", default=True)
    output_format = Input(
        description="File format of the samples and control maps: png (lossless, the default), webp or jpg",
        choices=["png", "webp", "jpg"], default="png",
    )
    output_quality = Input(
        description="Quality of webp and jpg outputs, 1-100 (default 80); png ignores it", default=80, ge=1, le=100
    )
    preprocess_only = Input(
        description="Only compute and return the control map; no image is generated", default=False
    )
    width = Input(
        description="Exact output width in pixels (0 = from image_resolution). With only one of width/height, "
        "the other keeps the image's aspect",
        default=0, ge=0, le=2048,
    )
    height = Input(
        description="Exact output height in pixels (0 = from image_resolution)", default=0, ge=0, le=2048
    )

    # -- your own style, per request -------------------------------------------------------------
    # Strings, not files: the server fetches them into its own bounded cache (Cog would re-download
    # a file input on every request, with no size bound).
    lora_url = Input(
        description="An SD 1.5 LoRA .safetensors (diffusers/PEFT or kohya format) as an http(s) URL or data: URI; "
        "cached by URL",
        default="",
    )
    lora_scale = Input(description="How strongly the LoRA applies (0 = not at all)", default=1.0, ge=0.0, le=2.0)
    embedding_url = Input(
        description="A textual-inversion embedding .safetensors as an http(s) URL or data: URI", default=""
    )
    embedding_token = Input(
        description="The token the prompt uses for the embedding, e.g. <my-style>", default=""
    )

    # -- editing a photo (img2img, inpainting), every image ----------------------------------------
    init_image = Input(
        description="Photo to edit (URL or data: URI); none: generate from noise. Sized as image is",
        default=None,
    )
    mask_image = Input(
        description="Inpainting mask: white regenerates, black keeps (grey: white from 128). Without init_image "
        "it edits image; none: the whole image",
        default=None,
    )
    strength = Input(
        description="How much of init_image (or the masked area) is regenerated: 1 = all of it; above 0. "
        "Only with init_image or mask_image",
        default=0.8, ge=0.0, le=1.0,
    )
    mask_blur = Input(
        description="Feathers the mask's edge by this many pixels; 0 = a hard edge", default=4, ge=0, le=64
    )


    # -- the multi image's units of control (named as fofr/cog-sdxl-multi-controlnet-lora names them) --
    # Literal, one entry per unit: Cog's static parser reads literals. Each unit's detector runs with
    # its condition's default options.
    controlnet_1 = Input(
        description="Unit 1: the condition whose detector and ControlNet it uses (none: no unit 1). The output is "
        "the control map of each active unit, in unit order, then the samples",
        choices=["none", "canny", "depth", "hed", "hough", "normal", "pose", "scribble", "seg", "lineart", "softedge",
                 "shuffle", "tile", "ip2p"],
        default="none",
    )
    controlnet_1_image = Input(
        description="Unit 1's image (URL or data: URI); it sets the size, as image_resolution and width/height say",
        default=None,
    )
    controlnet_1_conditioning_scale = Input(
        description="Unit 1's strength (0 = no effect)", default=1.0, ge=0.0, le=2.0
    )
    controlnet_1_start = Input(
        description="Fraction of the steps after which unit 1 starts acting", default=0.0, ge=0.0, le=1.0
    )
    controlnet_1_end = Input(
        description="Fraction of the steps after which unit 1 stops acting (must exceed its start)",
        default=1.0, ge=0.0, le=1.0,
    )
    controlnet_1_image_is_map = Input(
        description="Unit 1's image already is a map of its condition: skip the detector", default=False
    )
    controlnet_2 = Input(
        description="Unit 2: the condition whose detector and ControlNet it uses (none: no unit 2)",
        choices=["none", "canny", "depth", "hed", "hough", "normal", "pose", "scribble", "seg", "lineart", "softedge",
                 "shuffle", "tile", "ip2p"],
        default="none",
    )
    controlnet_2_image = Input(
        description="Unit 2's image (URL or data: URI), centre-cropped to the first unit's aspect",
        default=None,
    )
    controlnet_2_conditioning_scale = Input(
        description="Unit 2's strength (0 = no effect)", default=1.0, ge=0.0, le=2.0
    )
    controlnet_2_start = Input(
        description="Fraction of the steps after which unit 2 starts acting", default=0.0, ge=0.0, le=1.0
    )
    controlnet_2_end = Input(
        description="Fraction of the steps after which unit 2 stops acting (must exceed its start)",
        default=1.0, ge=0.0, le=1.0,
    )
    controlnet_2_image_is_map = Input(
        description="Unit 2's image already is a map of its condition: skip the detector", default=False
    )
    controlnet_3 = Input(
        description="Unit 3: the condition whose detector and ControlNet it uses (none: no unit 3)",
        choices=["none", "canny", "depth", "hed", "hough", "normal", "pose", "scribble", "seg", "lineart", "softedge",
                 "shuffle", "tile", "ip2p"],
        default="none",
    )
    controlnet_3_image = Input(
        description="Unit 3's image (URL or data: URI), centre-cropped to the first unit's aspect",
        default=None,
    )
    controlnet_3_conditioning_scale = Input(
        description="Unit 3's strength (0 = no effect)", default=1.0, ge=0.0, le=2.0
    )
    controlnet_3_start = Input(
        description="Fraction of the steps after which unit 3 starts acting", default=0.0, ge=0.0, le=1.0
    )
    controlnet_3_end = Input(
        description="Fraction of the steps after which unit 3 stops acting (must exceed its start)",
        default=1.0, ge=0.0, le=1.0,
    )
    controlnet_3_image_is_map = Input(
        description="Unit 3's image already is a map of its condition: skip the detector", default=False
    )

    # -- the zimage image (Z-Image-Turbo + Fun ControlNet Union 2.1): where a meaning differs from SD 1.5's --
    condition = Input(
        description="The structure the ControlNet follows, made from the image by this detector: canny (edges), "
        "depth (MiDaS), hed (soft edges), hough (M-LSD straight lines), pose (OpenPose skeleton)",
        choices=["canny", "depth", "hed", "hough", "pose"], default="canny",
    )
    num_inference_steps = Input(
        description="Denoising steps; Z-Image-Turbo is distilled to 8", default=8, ge=1, le=50
    )
    guidance_scale = Input(
        description="Classifier-free guidance; 0 (the turbo model's own setting) turns it off. Above 0 the "
        "negative prompt applies and each step runs the model twice",
        default=0.0, ge=0.0, le=10.0,
    )
    negative_prompt = Input(description="What to avoid; used only when guidance_scale is above 0", default="")
    # Same names as on the SD 1.5 images (the parameter takes these entries: cog_base.predictor.ALIASES).
    union_conditioning_scale = Input(
        description="Control strength: how strongly the control map steers the image (0 = not at all); the model "
        "card advises 0.65-0.80",
        default=0.75, ge=0.0, le=2.0,
    )
    union_width = Input(
        description="Exact output width in pixels (0 = about one megapixel at the image's aspect, sides in "
        "multiples of 16). With only one of width/height, the other keeps the image's aspect",
        default=0, ge=0, le=2048,
    )
    union_height = Input(
        description="Exact output height in pixels (0 = about one megapixel at the image's aspect)",
        default=0, ge=0, le=2048,
    )

# The order every signature follows: these first, then the condition's detector options, then CONTROLS.
JAGILLEY_INPUTS = (
    "image", "prompt", "num_samples", "image_resolution", "ddim_steps", "scale", "seed", "eta", "a_prompt", "n_prompt",
)
CONTROLS = (
    "controlnet_conditioning_scale", "guess_mode", "control_guidance_start", "control_guidance_end", "scheduler",
    "control_image_is_map", "return_control_map", "output_format", "output_quality", "preprocess_only",
    "width", "height",
    "lora_url", "lora_scale", "embedding_url", "embedding_token",
    "init_image", "mask_image", "strength", "mask_blur",
)
# One unit of control's inputs. A single-condition image takes its one unit's inputs in the lists
# above; the multi image takes them per unit (controlnet_<n>_...) among its own inputs, so its head
# and tail are these lists without them.
UNIT_INPUTS = ("image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end",
               "control_image_is_map")
SHARED_HEAD = tuple(name for name in JAGILLEY_INPUTS if name not in UNIT_INPUTS)
SHARED_CONTROLS = tuple(name for name in CONTROLS if name not in UNIT_INPUTS)
# The multi image's units: the inputs of unit n are these names with n filled in.
UNIT_SLOT = ("controlnet_{n}", "controlnet_{n}_image", "controlnet_{n}_conditioning_scale", "controlnet_{n}_start",
             "controlnet_{n}_end", "controlnet_{n}_image_is_map")
MAX_UNITS = 3
# The zimage image's inputs: the shared names where the meaning is the same, its own where it differs
# (steps, guidance, negative prompt); no SD 1.5-only input (image_resolution, eta, scheduler, guess mode,
# a_prompt, textual inversion, img2img).
ZIMAGE_HEAD = ("image", "prompt", "condition", "num_samples", "num_inference_steps", "guidance_scale",
               "negative_prompt", "seed")
ZIMAGE_TAIL = (
    "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end", "control_image_is_map",
    "return_control_map", "output_format", "output_quality", "preprocess_only", "width", "height",
    "lora_url", "lora_scale", "mask_image", "mask_blur",
)



def read(entry) -> InputSpec:
    """An entry's default, bounds and choices as plain data: the one place that reads Cog's `Input`
    (a pydantic FieldInfo) inside. Read at import, before a schema build can change an entry (Cog
    0.16.12 pops "enum" out of it: see cog_base/cog016/choices.py)."""
    extra = entry.json_schema_extra if isinstance(entry.json_schema_extra, dict) else {}
    choices = extra.get("enum")
    return InputSpec(
        default=None if entry.is_required() else entry.default,
        low=next((m.ge for m in entry.metadata if hasattr(m, "ge")), None),
        high=next((m.le for m in entry.metadata if hasattr(m, "le")), None),
        choices=tuple(choices) if choices is not None else None,
    )


# Keyed by the entry, as aliases share one.
_SPECS = {id(entry): read(entry) for entry in vars(Inputs).values() if hasattr(entry, "json_schema_extra")}


def spec_of(entry) -> InputSpec:
    """The registry entry's spec, as read at import."""
    return _SPECS[id(entry)]


# The choice inputs whose choices are all numbers written as strings (num_samples, image_resolution), by name:
# jagilley's clients send them as JSON integers (image_resolution 768), which these inputs take as that choice.
NUMERIC_CHOICES = {
    name: spec_of(entry).choices for name, entry in vars(Inputs).items()
    if id(entry) in _SPECS and spec_of(entry).choices
    and all(choice.isascii() and choice.isdigit() for choice in spec_of(entry).choices)
}
