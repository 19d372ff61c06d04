"""Tiny Stable-Diffusion-shaped models with random weights, built from configs (no hub).

For tests and smoke runs only: they exercise every code path of a real checkpoint (text
encoder, UNet with cross-attention in down and up blocks, VAE, scheduler) in milliseconds.
``save_tiny_model`` writes a diffusers directory that ``model.path`` can point at.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_WORDS = "a an the of on in and photo picture cat dog ball box sun tree grass sky red blue ugly blurry glasses woman".split()


def tiny_components(seed: int = 0, *, pixel_space: bool = False, scheduler: str = "pndm") -> dict:
    """Components of a tiny SD pipeline, deterministic in ``seed``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PNDMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from negstudy.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(TINY_WORDS)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32 if pixel_space else 16,
        in_channels=3 if pixel_space else 4,
        out_channels=3 if pixel_space else 4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
    )
    vae = None
    if not pixel_space:
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,
        )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    sd_betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False)
    if scheduler == "pndm":
        sched = PNDMScheduler(skip_prk_steps=True, **sd_betas)
    else:
        sched = DDIMScheduler(clip_sample=False, **sd_betas)
    return dict(
        unet=unet.eval(),
        vae=vae.eval() if vae is not None else None,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=sched,
    )


def tiny_pipeline(seed: int = 0, *, pixel_space: bool = False, scheduler: str = "pndm"):
    """A ``StableDiffusionPipeline`` over :func:`tiny_components`."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **tiny_components(seed, pixel_space=pixel_space, scheduler=scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_model(directory: str | Path, seed: int = 0, *, pixel_space: bool = False) -> Path:
    """Write a tiny diffusers model directory (safetensors) and return its path."""
    directory = Path(directory)
    tiny_pipeline(seed, pixel_space=pixel_space).save_pretrained(directory, safe_serialization=True)
    return directory
