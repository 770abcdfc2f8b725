"""Networks (VAE, CaLID denoiser), their configurations and model files."""

from calid.models.checkpoint import LoadedModel, load_model, read_header, save_model
from calid.models.config import CONFIG_NAMES, ModelConfig, named_config
from calid.models.networks import CaLIDNet, build_vae

__all__ = ["CONFIG_NAMES", "CaLIDNet", "LoadedModel", "ModelConfig", "build_vae", "load_model", "named_config", "read_header", "save_model"]
