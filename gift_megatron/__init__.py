"""gift_megatron: GIFT and GFT post-training objectives for NVIDIA Megatron-Core.

Layers (each imports only the ones before it): ``objectives`` (math on plain tensors), ``parallel``
(vocab/context-parallel reductions, the CPU runtime for Megatron-Core), ``megatron`` (model building and the
training step). Importing this package imports no Megatron-Core module.
"""

__version__ = "0.1.0"
