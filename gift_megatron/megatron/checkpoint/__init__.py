"""Save and resume a training run as Megatron-Core distributed checkpoints (``torch_dist`` format).

A checkpoint is the directory ``root/step_{step:08d}/`` holding one Megatron distributed checkpoint with

- ``model`` (``model0``, ``model1``, ... for virtual-pipeline chunks): the model's sharded state dict;
- ``optimizer``: ``optimizer.sharded_state_dict(model_sharded_state_dict)`` (Megatron's own format, also for
  the distributed optimizer);
- ``opt_param_scheduler``: ``OptimizerParamScheduler.state_dict()`` when a scheduler is given;
- ``gift_rng_state``: every rank's RNG states (python ``random``, numpy, torch CPU, CUDA when present and
  the model-parallel tracker's ``get_cuda_rng_tracker().get_states()``), one ShardedObject per rank;
- ``step``, ``data_state`` (e.g. consumed samples, sampler state; must be the same on every rank, rank 0's
  is stored), ``extra`` (e.g. the resolved config), all picklable;

plus ``gift_checkpoint.json``, a manifest that rank 0 writes last: the step, the parallel layout, the
global shape of every model tensor, the model's layer spec (``"local"`` or ``"transformer_engine"``), the
optimizer kind and format, and the size of every file.

Atomicity (:mod:`.publish`). Every rank writes into a fresh temporary sibling ``root/.tmp_step_{step:08d}_{token}/``; after a
barrier rank 0 writes the manifest, renames the directory to its final name and then replaces
``root/latest`` (a temp file, fsync, ``os.replace``). A job killed at any point before that replace
leaves ``latest`` naming the previous complete checkpoint; leftover ``.tmp_*`` entries are never read and
are deleted by the next successful save. ``keep_last=K`` keeps the K newest complete checkpoints. This
relies on POSIX ``rename`` being atomic (local disks, NFS, Lustre, GPFS; not object stores) and on one
job at a time saving into ``root``.

Loading checks (:mod:`.manifest`) everything it can before touching the model: the directory and manifest exist, every
file listed in the manifest is present with its recorded size (a missing metadata file or a truncated
shard is caught here), every model tensor's global shape matches the checkpoint's, the checkpoint has the
optimizer / scheduler state asked for, and the optimizer format can be loaded in this layout. Problems
are gathered from every rank and raised as :class:`CheckpointError` on all of them (no rank is left
waiting in a collective). Megatron then reads the shards in place; bytes corrupted without changing a
file's size are only detected by the reader, after part of the model may have been overwritten.

Layer specs (:mod:`.workarounds` handles the extra state). On GPU the trainer builds Transformer Engine's layer spec, on CPU and in every converted
checkpoint the local spec; a checkpoint of either loads into a model of the other. What a TE model saves
was read from the sources of megatron-core 0.16.1 / 0.19.2 and Transformer Engine (>= 1.13, where
``te.pytorch.RMSNorm`` became a fusible op with extra state); TE does not run on CPU, so
tests/test_checkpoint_specs.py checks this on a CPU model that asks for exactly those keys:

- weights: both specs save the same ShardedTensor keys. TE fuses the pre-attention / pre-MLP RMSNorm into
  ``linear_qkv`` / ``linear_fc1`` (``layer_norm_weight``), and the local spec's ``sharded_state_dict_keys_map``
  saves ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight`` under those fused names.
- ``_extra_state`` (TE's FP8 metadata, ShardedObjects): the local spec's linear layers save ``None`` under
  the same keys, which TE's ``set_extra_state`` ignores; TE's norms (``final_layernorm``, ``q_layernorm``,
  ``k_layernorm``) save extra state the local spec has no counterpart for (where TE is installed, a
  local-spec model's ``final_layernorm`` is TE's too). Extra state the model asks for
  and the checkpoint lacks keeps its current (initial) value, named in the result's
  ``extra_state_not_loaded``; extra state in the checkpoint that the model does not ask for is not read.
  Modules whose torch state dict has ``_extra_state`` that their sharded state dict leaves out (TE's
  ``DotProductAttention`` in both versions) keep theirs too. A missing weight is still an error naming it.
- the manifest records the saving model's spec; loading compares it with the model's, so extra state
  missing from a checkpoint of the *same* spec (an FP8 run resumed without its scaling state) is logged as
  a warning rather than as the expected difference between specs. Manifests from before the field load
  as before, the spec read as unknown.

Resharding (measured on CPU with megatron-core 0.16.1 and 0.19.2; tests/test_checkpoint.py):

- model weights: any TP / PP / DP change (Megatron reshards sharded tensors, fused QKV and SwiGLU
  included). RNG states are restored only in the saving layout; elsewhere they are skipped and the result
  says so (``rng_restored``), as Megatron's own loader does.
- optimizer without the distributed optimizer: Adam's moments and step are stored per model tensor and
  reshard like the weights: TP, PP and DP changes all work.
- distributed optimizer: saved as ``dp_reshardable`` (Megatron-LM's default): DP may change, TP and PP
  may not; loading it in another TP/PP layout raises a clear error before anything is modified (load the
  weights only with ``optimizer=None``). ``fully_reshardable`` reshards everything but gathers on the CUDA
  device in both versions, so it is refused on CPU and untested here. Megatron's default
  ``fully_sharded_model_space`` fails in both versions ("ShardedTensor.flattened_range is not
  supported") and is refused.

Modules: :mod:`.publish` (the file protocol: step directories, atomic publication, ``latest``; no process
group, no Megatron-Core), :mod:`.manifest` (the manifest and the checks made against it before loading),
:mod:`.workarounds` (what Megatron-Core's and Transformer Engine's behaviour requires: optimizer state and
steps, RNG states, extra state), :mod:`.save_load` (``save_checkpoint``, ``load_checkpoint`` and the
model-state helpers).
"""

from gift_megatron.megatron.checkpoint.manifest import (
    FORMAT_VERSION,
    CheckpointError,
    read_manifest,
    verify_checkpoint,
)
from gift_megatron.megatron.checkpoint.publish import (
    LATEST_NAME,
    MANIFEST_NAME,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
)
from gift_megatron.megatron.checkpoint.save_load import (
    LOCAL_SPEC,
    TE_SPEC,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "FORMAT_VERSION",
    "LATEST_NAME",
    "LOCAL_SPEC",
    "MANIFEST_NAME",
    "TE_SPEC",
    "CheckpointError",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
    "verify_checkpoint",
]
