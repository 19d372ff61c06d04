"""Tiny Stable-Diffusion-shaped models with random weights, built from configs (no hub).

For tests and smoke runs only: they exercise every code path of a real checkpoint (text
encoder, UNet with cross-attention in down and up blocks, VAE, scheduler) in milliseconds.
``save_tiny_model`` writes a diffusers directory that ``model.path`` can point at; ``save_tiny_owl``
an OWLv2 detector that ``evaluator.path`` can.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_WORDS = "a an the of on in and photo picture cat dog ball box sun tree grass sky red blue ugly blurry glasses woman".split()


def tiny_vae(seed: int = 0, **config):
    """A tiny AutoencoderKL (2x down-sampling, 4 latent channels), deterministic in ``seed``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                         norm_num_groups=32, sample_size=32, **config)


def tiny_components(seed: int = 0, *, pixel_space: bool = False, scheduler: str = "pndm") -> dict:
    """Components of a tiny SD pipeline, deterministic in ``seed``."""
    from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel
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
    vae = None if pixel_space else tiny_vae(seed)
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


# ----------------------------------------------------------------------------- SDXL

def tiny_sdxl_components(seed: int = 0, *, scheduler: str = "euler") -> dict:
    """Components of a tiny SDXL pipeline (stabilityai/stable-diffusion-xl-base-1.0's layout), deterministic in ``seed``.

    Two CLIP text encoders (the second with a projection: its pooled output conditions the UNet),
    a UNet with ``addition_embed_type="text_time"`` whose second level has transformer depth 2
    (as SDXL's deeper levels have depth > 1), a 2-level VAE: 16x16 latents, 32x32 images (the
    shapes oracle's size). The second tokenizer pads with "!" like SDXL's ``tokenizer_2``.
    scheduler: "euler" (SDXL's own, EulerDiscrete) or "ddim".
    """
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from negstudy.shapes.world import VOCABULARY
    from negstudy.tokenizer import build_clip_tokenizer

    words = sorted(set(TINY_WORDS) | set(VOCABULARY))
    tokenizer = build_clip_tokenizer(words)
    tokenizer_2 = build_clip_tokenizer(words)
    tokenizer_2.pad_token = "!"
    text_dim, projection_dim, time_dim = 32, 32, 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=2 * text_dim,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection_dim,  # 6 time ids + the pooled text
        norm_num_groups=32,
    )
    vae = tiny_vae(seed, scaling_factor=0.13025)  # SDXL's scaling factor
    encoders = []
    for k, cls in enumerate((CLIPTextModel, CLIPTextModelWithProjection)):
        torch.manual_seed(seed + k)
        encoders.append(cls(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=projection_dim,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )).eval())
    sdxl_betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      timestep_spacing="leading")
    if scheduler == "euler":
        sched = EulerDiscreteScheduler(**sdxl_betas)
    elif scheduler == "ddim":
        sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **sdxl_betas)
    else:
        raise ValueError(f"scheduler={scheduler!r}: expected 'euler' or 'ddim'")
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=encoders[0], text_encoder_2=encoders[1],
                tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=sched)


def tiny_sdxl_pipeline(seed: int = 0, *, scheduler: str = "euler"):
    """A ``StableDiffusionXLPipeline`` over :func:`tiny_sdxl_components` (no watermark, zeros for the empty prompt)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed, scheduler=scheduler), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sdxl(directory: str | Path, seed: int = 0, *, world: str | None = None) -> Path:
    """Write a tiny SDXL diffusers directory (safetensors) and return its path.

    world: a ``negstudy: {world: ...}`` marker in model_index.json ("shapes": the studies then read
    its 32x32 images with the shapes readers; without it, as any SDXL, with the evaluator named).
    """
    import json

    directory = Path(directory)
    tiny_sdxl_pipeline(seed).save_pretrained(directory, safe_serialization=True)
    if world is not None:
        index_path = directory / "model_index.json"
        index = json.loads(index_path.read_text())
        index["negstudy"] = {"world": world, "resolution": 32}
        index_path.write_text(json.dumps(index, indent=2) + "\n")
    return directory


# ----------------------------------------------------------------------------- readers


def save_tiny_owl(directory: str | Path, words=(), side: int = 32, seed: int = 0) -> Path:
    """Write a tiny random ``Owlv2ForObjectDetection`` + ``Owlv2Processor`` (``side`` px input, 8 px
    patches) that ``evaluator=owl evaluator.path=<directory>`` loads; its box head is zeroed so every
    box is the grid prior (well-formed, not random extremes). ``words``: extra vocabulary."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    from negstudy.shapes.world import OBJECT_NAMES
    from negstudy.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(sorted({"a", "photo", "of", *OBJECT_NAMES, *TINY_WORDS, *words}), model_max_length=16)
    tokenizer.pad_token = "!"  # OWL's pad token: id 0, as the text config says
    config = Owlv2Config(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "max_position_embeddings": 16, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": side, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    directory = Path(directory)
    model.save_pretrained(directory)
    Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size={"height": side, "width": side}),
                   tokenizer=tokenizer).save_pretrained(directory)
    return directory
