"""Loading checkpoints through from_pretrained: local directories, scheduler choice, clear errors."""

import pytest
import torch
from omegaconf import OmegaConf

from negstudy.config import ModelConfig
from negstudy.errors import ConfigError, ModelNotFoundError
from negstudy.models import load_pipeline, load_scheduler, pick_device, pick_dtype


def model_cfg(path, **kw):
    return OmegaConf.structured(ModelConfig(name="m", path=str(path), **kw))


@pytest.mark.parametrize("name, cls", [("default", "PNDMScheduler"), ("pndm", "PNDMScheduler"), ("ddim", "DDIMScheduler"),
                                       ("euler", "EulerDiscreteScheduler"), ("dpmpp", "DPMSolverMultistepScheduler")])
def test_scheduler_choice_keeps_the_checkpoint_betas(tiny_model_dir, name, cls):
    s = load_scheduler(model_cfg(tiny_model_dir, scheduler=name))
    assert type(s).__name__ == cls
    assert s.config.beta_schedule == "scaled_linear" and s.config.beta_end == 0.012


def test_local_directory_loads_through_from_pretrained(tiny_model_dir, tiny_pixel_model_dir):
    pipe = load_pipeline(model_cfg(tiny_model_dir), torch.device("cpu"))
    assert pipe.vae is not None and pipe.unet.dtype == torch.float32
    pixel = load_pipeline(model_cfg(tiny_pixel_model_dir, scheduler="ddim"), torch.device("cpu"))
    assert pixel.vae is None and type(pixel.scheduler).__name__ == "DDIMScheduler"


def test_missing_hub_model_says_how_to_get_it():
    with pytest.raises(ModelNotFoundError) as err:
        load_pipeline(model_cfg("stabilityai/stable-diffusion-2-base"), torch.device("cpu"))
    message = str(err.value)
    assert "model.path='stabilityai/stable-diffusion-2-base'" in message
    assert "hf download stabilityai/stable-diffusion-2-base --local-dir" in message
    assert "\n" not in message


def test_pickled_weights_need_an_opt_in(tiny_model_dir, tmp_path):
    from negstudy.tiny import tiny_pipeline

    tiny_pipeline(0).save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(ConfigError, match="set model.allow_pickle=true only if you trust"):
        load_pipeline(model_cfg(tmp_path / "pickled"), torch.device("cpu"))
    assert load_pipeline(model_cfg(tmp_path / "pickled", allow_pickle=True), torch.device("cpu")).unet is not None


def test_device_and_dtype_defaults():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device='cuda': no CUDA device is visible"):
            pick_device("cuda")
