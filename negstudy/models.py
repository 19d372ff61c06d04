"""Loading checkpoints: the shipped shapes model and real Stable Diffusion checkpoints, one code path.

Every model is a diffusers directory (``model_index.json`` + component subfolders) or a hub id,
loaded with ``DiffusionPipeline.from_pretrained``. The shipped shapes model is pixel-space: its
``model_index.json`` has no VAE, and the sampler then treats the UNet sample as the image.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from negstudy.errors import ConfigError, ModelNotFoundError

SCHEDULER_CLASSES = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",  # stochastic: per-step noise continues each image's seed stream
    "dpmpp_sde": "DPMSolverMultistepScheduler",  # stochastic: SDE-DPM-Solver++ (algorithm_type below)
}
SCHEDULER_OPTIONS = {"dpmpp_sde": {"algorithm_type": "sde-dpmsolver++"}}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUILTIN_PREFIX = "builtin:"


def builtin_model_dir(name: str) -> Path:
    """Directory of a model shipped inside the package (``builtin:shapes``)."""
    return Path(__file__).parent / "models" / name


def resolve_model_path(path: str, *, key: str = "model.path", marker: str = "model_index.json",
                       kind: str = "", hint: str = "a local directory written by save_pretrained or a hub id such as "
                                                  "stabilityai/stable-diffusion-2-base") -> tuple[str, bool]:
    """(path or hub id to hand to ``from_pretrained``, whether it is local). ``marker`` is the file
    that makes a directory a model (model_index.json for diffusers, config.json for transformers);
    ``kind`` names the model in messages ("CLIP "); ConfigError names ``key``."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        local = builtin_model_dir(name)
        if not (local / marker).exists():
            shipped = sorted(p.parent.name for p in local.parent.glob(f"*/{marker}")) if local.parent.exists() else []
            raise ConfigError(f"{key}={path!r}: no shipped {kind}model of that name (shipped: {', '.join(shipped) or 'none'})")
        return str(local), True
    expanded = Path(path).expanduser()
    if path.startswith(("/", "./", "../", "~")) or expanded.exists():
        if not (expanded / marker).exists():
            raise ConfigError(f"{key}={path!r}: not a {kind or 'diffusers '}model directory (no {marker} there); give {hint}")
        return str(expanded), True
    if not HUB_ID.match(path):
        raise ConfigError(f"{key}={path!r}: neither an existing local directory nor a hub id of the form org/name")
    return path, False


def pick_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu for ``auto``; a named device that is absent is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda': no CUDA device is visible (allowed here: auto, cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps': no MPS device is visible (allowed here: auto, cpu)")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _how_to_get(path: str, cause: BaseException) -> ModelNotFoundError:
    reason = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
    return ModelNotFoundError(
        f"model.path={path!r}: the checkpoint is not available here ({reason}). "
        f"On a machine with internet run `hf download {path} --local-dir <DIR>` "
        "(accept the model's licence on the hub first if it asks), copy <DIR> here and set model.path=<DIR>"
    )


def _hub_kwargs(model_cfg) -> dict:
    return dict(revision=model_cfg.revision, local_files_only=bool(model_cfg.local_files_only))


def load_scheduler(model_cfg):
    """The scheduler the config asks for, built from the checkpoint's scheduler config (no weights)."""
    import diffusers

    path, _ = resolve_model_path(model_cfg.path)
    try:
        config = diffusers.PNDMScheduler.load_config(path, subfolder="scheduler", **_hub_kwargs(model_cfg))
    except Exception as err:  # hub unreachable, repo missing, gated, ...
        raise _how_to_get(model_cfg.path, err) from None
    class_name = config["_class_name"] if model_cfg.scheduler == "default" else SCHEDULER_CLASSES[model_cfg.scheduler]
    # DDIM's own default clip_sample=True clips x0 to [-1, 1], which corrupts latent-space samples;
    # keep the checkpoint's choice where it states one.
    config = {"clip_sample": False, **config, **SCHEDULER_OPTIONS.get(model_cfg.scheduler, {})}
    return getattr(diffusers, class_name).from_config(config)


def load_pipeline(model_cfg, device: torch.device):
    """The checkpoint's pipeline (components on ``device``), with the scheduler the config names."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlogging

    path, local = resolve_model_path(model_cfg.path)
    scheduler = load_scheduler(model_cfg)
    dtype = pick_dtype(model_cfg.dtype, device)
    kwargs = dict(scheduler=scheduler, torch_dtype=dtype, **_hub_kwargs(model_cfg))
    if model_cfg.variant:
        kwargs["variant"] = model_cfg.variant
    if not model_cfg.allow_pickle:
        kwargs["use_safetensors"] = True
    index = _model_index(path) if local else {}
    # components the checkpoint declares absent ([null, null]), e.g. the shapes model's VAE
    kwargs.update({k: None for k, v in index.items() if not k.startswith("_") and v == [None, None]})
    if "safety_checker" in index or not local:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # the "safety checker disabled" banner is noise in a study
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch_dtype's rename, across diffusers versions
            pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        if "safetensors" in str(err) and not model_cfg.allow_pickle:
            raise ConfigError(
                f"model.path={model_cfg.path!r}: no .safetensors weights; set model.allow_pickle=true "
                "only if you trust the checkpoint (pickled weights can run code)"
            ) from None
        raise _how_to_get(model_cfg.path, err) from None
    finally:
        dlogging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _model_index(path: str) -> dict:
    return json.loads((Path(path) / "model_index.json").read_text())

