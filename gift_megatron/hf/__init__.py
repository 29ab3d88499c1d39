"""Layer 4: Hugging Face <-> Megatron weights for Llama-2/3, Qwen2/2.5, Qwen3 dense and the Mixture-of-Experts
Qwen3-MoE, Qwen2-MoE and Mixtral.

- ``mapping``: one table per family (Megatron name -> HF names and layout rule), QKV / fc1 fusing,
  ``hf_config_dict`` (config.json of a ModelConfig);
- ``hf_io``: HF folders (validated reading, streaming shard by shard; sharded safetensors writing with the
  index; tokenizer files);
- ``load``: ``load_hf_weights_into_model`` (fill a TP/PP-sharded model from HF tensors in memory or a folder);
- ``export``: ``iter_hf_weights`` (stream a TP/PP-sharded model as HF-named full tensors, no disk);
- ``convert``: whole-checkpoint conversion both ways (``tools/convert_*.py``), one layer at a time
  (``streaming``);
- ``verify``: the logits of a converted checkpoint next to transformers' (``tools/verify_conversion.py``).

Importing this package imports neither Megatron-Core nor transformers.
"""

from gift_megatron.hf.convert import (
    CONVERSION_FILE,
    build_cpu_model,
    checkpoint_dtype,
    hf_to_megatron,
    megatron_to_hf,
    model_config_from_info,
    read_conversion_info,
    resolve_checkpoint,
    single_process_megatron,
)
from gift_megatron.hf.export import iter_hf_tensors, iter_hf_weights
from gift_megatron.hf.hf_io import (
    ConversionError,
    HFCheckpoint,
    SafetensorsShardWriter,
    check_tokenizer_fits,
    parse_size,
    write_hf_config,
    write_safetensors_shards,
)
from gift_megatron.hf.load import load_hf_weights_into_model
from gift_megatron.hf.mapping import (
    FAMILY_TABLES,
    HF_ARCHITECTURES,
    MOE_ARCHITECTURES,
    SUPPORTED_ARCHITECTURES,
    expected_hf_shapes,
    fuse_fc1,
    fuse_qkv,
    hf_config_dict,
    megatron_tensor_from_hf,
    megatron_tensor_to_hf,
    split_fc1,
    split_fused_hf,
    split_qkv,
)

__all__ = [
    "CONVERSION_FILE",
    "FAMILY_TABLES",
    "HF_ARCHITECTURES",
    "MOE_ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "ConversionError",
    "HFCheckpoint",
    "SafetensorsShardWriter",
    "build_cpu_model",
    "check_tokenizer_fits",
    "checkpoint_dtype",
    "expected_hf_shapes",
    "fuse_fc1",
    "fuse_qkv",
    "hf_config_dict",
    "hf_to_megatron",
    "iter_hf_tensors",
    "iter_hf_weights",
    "load_hf_weights_into_model",
    "megatron_tensor_from_hf",
    "megatron_tensor_to_hf",
    "megatron_to_hf",
    "model_config_from_info",
    "parse_size",
    "read_conversion_info",
    "resolve_checkpoint",
    "single_process_megatron",
    "split_fc1",
    "split_fused_hf",
    "split_qkv",
    "write_hf_config",
    "write_safetensors_shards",
]
