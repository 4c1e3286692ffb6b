"""Train a ControlNet on paired images: diffusers' ControlNet recipe (examples/controlnet/train_controlnet.py)
on accelerate, without Cog.

The trainable copy starts from the base UNet's encoder (`ControlNetModel.from_unet`) and joins the
locked UNet through zero-initialised convolutions, so step 0 is exactly the base model. VAE, text
encoder and UNet stay frozen (in the mixed-precision dtype); the ControlNet trains in fp32 under
accelerate's autocast, on the noise-prediction MSE, with AdamW at a constant learning rate.
"""

from __future__ import annotations

import math
import secrets
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from models import default_device
from models.pipeline import ControlNetRunner, Request, _variant
from models.train_data import Pair, square

MIXED_PRECISION = ("fp16", "bf16", "no")
# Progress lines come at this interval (and on the first and last step), whatever the step rate.
PROGRESS_EVERY_S = 10.0
VALIDATION_STEPS = 20  # sampler steps for validation images (DDIM, as served)


@dataclass
class TrainConfig:
    max_train_steps: int = 1000
    learning_rate: float = 1e-5
    train_batch_size: int = 4
    resolution: int = 512
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = False
    seed: int | None = None
    validation_prompts: tuple[str, ...] = ()  # empty: the first pair's caption
    validation_every: int = 0  # 0: validate once, after the last step
    validation_steps: int = VALIDATION_STEPS
    max_grad_norm: float = 1.0
    progress_every_s: float = PROGRESS_EVERY_S

    def check(self) -> None:
        if self.max_train_steps < 0:
            raise ValueError(f"max_train_steps must be 0 or more, not {self.max_train_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, not {self.learning_rate}")
        if self.train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("train_batch_size and gradient_accumulation_steps must be at least 1")
        if self.resolution < 64 or self.resolution % 64:
            raise ValueError(f"resolution must be a multiple of 64 (64 or more), not {self.resolution}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, not {self.mixed_precision!r}")
        if self.validation_every < 0:
            raise ValueError(f"validation_every must be 0 or more, not {self.validation_every}")


@dataclass
class TrainResult:
    controlnet_dir: Path
    losses: list[float]  # per optimizer step (mean over the accumulated micro-batches)
    validation_images: list[Path] = field(default_factory=list)
    seed: int = 0
    seconds: float = 0.0
    peak_memory_gb: float | None = None  # CUDA only


@dataclass
class Frozen:
    """The locked parts of SD 1.5 the ControlNet trains against."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    scheduler_dir: Path


def load_frozen(base_dir: Path, device: str, dtype: torch.dtype = torch.float32) -> Frozen:
    """VAE and text encoder in `dtype`; the UNet in fp32, because the ControlNet copies its encoder and
    trains in fp32 (train_controlnet casts the UNet once the copy is made)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per load is noise in a training's logs
    base_dir = Path(base_dir)

    def load(cls, sub: str, dtype: torch.dtype):
        folder = base_dir / sub
        model = cls.from_pretrained(folder, torch_dtype=dtype, variant=_variant(folder), local_files_only=True)
        model.requires_grad_(False)
        return model.to(device).eval()

    return Frozen(
        tokenizer=CLIPTokenizer.from_pretrained(base_dir / "tokenizer", local_files_only=True),
        text_encoder=load(CLIPTextModel, "text_encoder", dtype),
        vae=load(AutoencoderKL, "vae", dtype),
        unet=load(UNet2DConditionModel, "unet", torch.float32),
        noise_scheduler=DDPMScheduler.from_pretrained(base_dir / "scheduler", local_files_only=True),
        scheduler_dir=base_dir / "scheduler",
    )


def initial_controlnet(unet, init_from: Path | None = None):
    """The ControlNet training starts from: the base UNet's encoder with zero convolutions (ControlNet's
    own start), or an existing ControlNet folder to fine-tune."""
    from diffusers import ControlNetModel

    if init_from is None:
        controlnet = ControlNetModel.from_unet(unet)
    else:
        controlnet = ControlNetModel.from_pretrained(init_from, torch_dtype=torch.float32, local_files_only=True)
    return controlnet.to(unet.device)


def write_untrained_controlnet(base_dir: Path, dest: Path) -> None:
    """What the custom image serves before any training: ControlNet's own start, which leaves the base
    model's output unchanged."""
    from diffusers import UNet2DConditionModel

    unet_dir = Path(base_dir) / "unet"
    unet = UNet2DConditionModel.from_pretrained(
        unet_dir, torch_dtype=torch.float32, variant=_variant(unet_dir), local_files_only=True
    )
    initial_controlnet(unet).save_pretrained(dest)


class PairDataset(torch.utils.data.Dataset):
    """diffusers' recipe: targets in [-1, 1], control maps in [0, 1], captions tokenized to 77."""

    def __init__(self, pairs: list[Pair], resolution: int, tokenizer):
        self.pairs, self.resolution, self.tokenizer = pairs, resolution, tokenizer

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pair = self.pairs[index]
        target = torch.from_numpy(square(pair.image, self.resolution)).permute(2, 0, 1).float() / 127.5 - 1.0
        control = torch.from_numpy(square(pair.conditioning, self.resolution)).permute(2, 0, 1).float() / 255.0
        ids = self.tokenizer(
            pair.caption, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        return {"pixel_values": target, "conditioning_pixel_values": control, "input_ids": ids}


def denoising_loss(controlnet, frozen: Frozen, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """The recipe's loss: noise the target's latents at a random timestep, predict the noise with the locked
    UNet plus the ControlNet's residuals, MSE against the noise (or v, for v-prediction bases)."""
    dtype = frozen.vae.dtype
    device = frozen.unet.device
    pixels = batch["pixel_values"].to(device, dtype)
    latents = frozen.vae.encode(pixels).latent_dist.sample(generator) * frozen.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    steps = frozen.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device).long()
    noisy = frozen.noise_scheduler.add_noise(latents, noise, timesteps)
    text = frozen.text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
    down, mid = controlnet(
        noisy, timesteps, encoder_hidden_states=text,
        controlnet_cond=batch["conditioning_pixel_values"].to(device, dtype), return_dict=False,
    )
    prediction = frozen.unet(
        noisy, timesteps, encoder_hidden_states=text,
        down_block_additional_residuals=[r.to(dtype) for r in down],
        mid_block_additional_residual=mid.to(dtype), return_dict=False,
    )[0]
    if frozen.noise_scheduler.config.prediction_type == "v_prediction":
        target = frozen.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def validation_pipeline(frozen: Frozen, controlnet):
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=frozen.vae, text_encoder=frozen.text_encoder, tokenizer=frozen.tokenizer, unet=frozen.unet,
        controlnet=controlnet,
        scheduler=DDIMScheduler.from_pretrained(frozen.scheduler_dir, local_files_only=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, every_s: float, log: Callable[[str], None]):
        self.total, self.every_s, self.log = total, every_s, log
        self.start = self.last = time.perf_counter()

    def step(self, step: int, loss: float, lr: float, force: bool = False) -> None:
        now = time.perf_counter()
        if not (force or step in (1, self.total) or now - self.last >= self.every_s):
            return
        self.last = now
        rate = step / max(now - self.start, 1e-9)
        self.log(
            f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.2f} steps/s  "
            f"elapsed {_duration(now - self.start)}  ETA {_duration((self.total - step) / rate)}"
        )


def train_controlnet(
    base_dir: Path,
    pairs: list[Pair],
    out_dir: Path,
    config: TrainConfig,
    init_from: Path | None = None,
    log: Callable[[str], None] = print,
    device: str | None = None,
) -> TrainResult:
    """Train, validate at each `validation_every` steps and after the last, and save the ControlNet
    (diffusers folder: config.json + diffusion_pytorch_model.safetensors) into out_dir/controlnet."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    config.check()
    started = time.perf_counter()
    device = device or default_device()
    mixed_precision = config.mixed_precision
    if not device.startswith("cuda") and mixed_precision != "no":
        log(f"No GPU: mixed_precision {mixed_precision} needs CUDA, training in fp32 instead")
        mixed_precision = "no"
    seed = config.seed if config.seed else secrets.randbelow(2**31 - 1) + 1
    log(f"Using seed: {seed}")
    set_seed(seed)
    accelerator = Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=not device.startswith("cuda"),
    )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    # The ControlNet trains in fp32 under accelerate's autocast; only the frozen parts run in weight_dtype.
    frozen = load_frozen(base_dir, accelerator.device, weight_dtype)
    controlnet = initial_controlnet(frozen.unet, init_from)
    if weight_dtype != torch.float32:
        frozen.unet.to(dtype=weight_dtype)
    controlnet.train()
    if config.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    log(f"ControlNet from {'the base UNet (zero convolutions)' if init_from is None else 'an existing ControlNet'}; "
        f"{sum(p.numel() for p in controlnet.parameters()) / 1e6:.1f}M trainable parameters, "
        f"frozen base in {str(weight_dtype).removeprefix('torch.')}, on {accelerator.device}")

    dataset = PairDataset(pairs, config.resolution, frozen.tokenizer)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.train_batch_size, shuffle=True, drop_last=False,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=config.learning_rate)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    controlnet, optimizer, loader, lr_scheduler = accelerator.prepare(controlnet, optimizer, loader, lr_scheduler)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    validations: list[Path] = []
    losses: list[float] = []
    total = config.max_train_steps
    per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    log(f"Training {total} steps: batch {config.train_batch_size} x {config.gradient_accumulation_steps} "
        f"accumulated, {len(pairs)} pairs ({per_epoch} steps per epoch), lr {config.learning_rate:g}, "
        f"{config.resolution}px, mixed precision {mixed_precision}")
    progress = Progress(total, config.progress_every_s, log)
    step, accumulated = 0, []
    while step < total:
        for batch in loader:
            with accelerator.accumulate(controlnet):
                loss = denoising_loss(controlnet, frozen, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(controlnet.parameters(), config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            accumulated.append(loss.detach().item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            losses.append(sum(accumulated) / len(accumulated))
            accumulated = []
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(
                    f"the loss became {losses[-1]} at step {step}; lower learning_rate or use mixed_precision bf16/no"
                )
            progress.step(step, losses[-1], lr_scheduler.get_last_lr()[0])
            if config.validation_every and step % config.validation_every == 0 and step < total:
                validations += validate(accelerator, frozen, controlnet, pairs, config, step, seed, out_dir, log)
            if step >= total:
                break
    validations += validate(accelerator, frozen, controlnet, pairs, config, step, seed, out_dir, log)

    folder = out_dir / "controlnet"
    accelerator.unwrap_model(controlnet).save_pretrained(folder)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 1024**3 if accelerator.device.type == "cuda" else None
    log(f"Trained {step} steps in {_duration(seconds)}" + (f", peak GPU memory {peak:.1f} GiB" if peak else ""))
    return TrainResult(folder, losses, validations, seed, seconds, peak)


def validate(accelerator, frozen, controlnet, pairs, config, step, seed, out_dir, log) -> list[Path]:
    """One image per validation prompt, on the i-th pair's control map (cycling), sampled as served;
    saved as [control map | sample] so a person sees what steered it."""
    prompts = config.validation_prompts or (pairs[0].caption,)
    start = time.perf_counter()
    net = accelerator.unwrap_model(controlnet)
    net.eval()
    runner = ControlNetRunner(validation_pipeline(frozen, net), detector=None, detect_at_resolution=False,
                              log=lambda line: None)
    paths = []
    with accelerator.autocast():
        for i, prompt in enumerate(prompts):
            control = square(pairs[i % len(pairs)].conditioning, config.resolution)
            sample = runner.generate(control, Request(prompt=prompt, steps=config.validation_steps, guidance_scale=7.5,
                                                      seed=seed)).samples[0]
            sheet = Image.new("RGB", (2 * config.resolution, config.resolution))
            sheet.paste(Image.fromarray(control), (0, 0))
            sheet.paste(sample, (config.resolution, 0))
            path = out_dir / f"validation-step{step:06d}-{i}.png"
            sheet.save(path)
            paths.append(path)
    net.train()
    log(f"Validation at step {step}: {len(paths)} image(s) in {time.perf_counter() - start:.1f}s")
    return paths


def write_tar(folder: Path, dest: Path) -> Path:
    """The trained ControlNet as one file: its folder's files at the tar's root, so unpacking it gives a
    folder that `ControlNetModel.from_pretrained` loads."""
    with tarfile.open(dest, "w") as tar:
        for path in sorted(Path(folder).iterdir()):
            tar.add(path, arcname=path.name)
    return dest

