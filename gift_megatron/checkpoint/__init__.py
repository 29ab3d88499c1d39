"""Layer 4: Hugging Face <-> Megatron weights: per-family mappings and the streaming export."""

from gift_megatron.checkpoint.convert import (
    ConversionError,
    HFCheckpoint,
    hf_to_megatron,
    load_hf_weights_into_model,
    megatron_to_hf,
    resolve_checkpoint,
    write_safetensors_shards,
)
from gift_megatron.checkpoint.export import iter_hf_weights
from gift_megatron.checkpoint.mapping import (
    FAMILY_TABLES,
    HF_ARCHITECTURES,
    fuse_fc1,
    fuse_qkv,
    hf_config_dict,
    megatron_tensor_to_hf,
    split_fc1,
    split_qkv,
)

__all__ = ["ConversionError", "HFCheckpoint", "hf_to_megatron", "load_hf_weights_into_model", "megatron_to_hf",
           "resolve_checkpoint", "write_safetensors_shards", "iter_hf_weights", "FAMILY_TABLES", "HF_ARCHITECTURES", "fuse_fc1", "fuse_qkv", "hf_config_dict",
           "megatron_tensor_to_hf", "split_fc1", "split_qkv"]
