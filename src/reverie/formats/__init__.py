"""Checkpoint formats: safe tensor I/O, diffusers folders, and single-file SD 1.x/2.x (LDM) checkpoints."""

from .folder import (find_weights, load_weights, read_config, read_model_index, save_component,
                     write_model_index)
from .safetensors_io import (FormatError, load_checkpoint, load_safetensors, load_state_dict_strict,
                             read_safetensors_header, save_safetensors)
from .single_file import infer_sd_configs, split_ldm_checkpoint, to_ldm_checkpoint

__all__ = ["FormatError", "find_weights", "infer_sd_configs", "load_checkpoint", "load_safetensors",
           "load_state_dict_strict", "load_weights", "read_config", "read_model_index", "read_safetensors_header",
           "save_component", "save_safetensors", "split_ldm_checkpoint", "to_ldm_checkpoint", "write_model_index"]
