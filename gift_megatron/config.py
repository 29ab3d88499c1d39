"""The training configuration: typed dataclasses loaded from YAML, with dotted ``key=value`` overrides.

    cfg = load_config("examples/tiny_cpu_gift.yaml", ["objective.name=grpo", "train.steps=10"])
    cfg.parallel.tensor_model_parallel_size, cfg.objective.options["beta"], cfg.run.output_dir

Every section is a dataclass; the model, parallel and precision sections are the Megatron integration's own
configs (:mod:`gift_megatron.megatron.model`), so a YAML file and a Python caller build the same objects.
Unknown keys, wrong types and invalid values are :class:`ConfigError` naming the dotted key (and the file).

Loaded with OmegaConf's structured configs: the schema is ``OmegaConf.structured(TrainConfig)``, built from
these same dataclasses, so the YAML file, the command line and a Python caller share one definition of every
key's type and default; the file and the overrides are read with OmegaConf's YAML loader and override grammar
(``3e-4`` is a float, ``[a, b]`` a list, ``null`` None), and ``OmegaConf.to_object`` builds the dataclasses,
running their ``__post_init__`` checks (a ``${section.key}`` in a value is OmegaConf's interpolation).
OmegaConf's own errors are turned into :class:`ConfigError` with the same dotted key. The two fields with a
fixed set of values are ``str`` with the choices in the field's metadata (:func:`_choice`), checked in
``__post_init__``: OmegaConf 2.3 rejects ``Literal`` annotations.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from gift_megatron.errors import StartupError
from gift_megatron.megatron.model import ModelConfig, ParallelConfig, PrecisionConfig


class ConfigError(StartupError):
    """A configuration that cannot run; the message names the dotted key and, when known, the file."""


def _choice(*choices: str) -> Any:
    """A ``str`` field that takes one of ``choices`` (the first is the default). Not a ``Literal``
    annotation: OmegaConf 2.3 rejects those; :func:`_check_choices` checks the value, config_doc lists them."""
    return field(default=choices[0], metadata={"choices": choices})


def _check_choices(obj: Any, section: str) -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(obj, f.name) not in choices:
            raise ValueError(f"{section}.{f.name}: must be one of {list(choices)}, got {getattr(obj, f.name)!r}")


@dataclass
class RunConfig:
    """output_dir: checkpoints (``checkpoints/``), metrics (``metrics.jsonl``), TensorBoard events
    (``tensorboard/``), plots (``plots/``) and the resolved config (``config.yaml``).
    resume: ``none`` (start fresh; refuses a non-empty checkpoint directory), ``auto`` (continue from the
    newest complete checkpoint if there is one) or a checkpoint path.
    save_interval: steps between checkpoints (0: only at the end). keep_last: checkpoints kept (None: all).
    seed: seeds the model initialization, the data order and the rollout sampling.
    log_interval: steps between metrics records and console lines. progress: a tqdm bar on rank 0 when
    stderr is a terminal; otherwise (a SLURM log file) and with ``progress: false`` one plain line every
    ``log_interval`` steps.
    show_warnings: show third-party Python warnings and library WARNING logs (Megatron-Core, torch,
    transformers), quiet by default; ``GIFT_MEGATRON_SHOW_WARNINGS=1`` also shows those printed before the
    config is read.
    warn_degenerate_steps: warn when every group has had equal rewards for this many steps in a row (no
    learning signal for group-relative objectives); 0: never.
    The run holds ``output_dir/run.lock`` while it runs: a second job on the same directory stops at once.
    tensorboard: also write TensorBoard events. wandb_project: also log to this W&B project (needs
    ``wandb``). plots: write PNG plots of the metrics at the end of the run.
    """

    output_dir: str = "runs/default"
    seed: int = 1234
    resume: str = "none"
    save_interval: int = 50
    keep_last: int | None = 3
    log_interval: int = 1
    tensorboard: bool = True
    wandb_project: str | None = None
    plots: bool = True
    progress: bool = True
    show_warnings: bool = False
    warn_degenerate_steps: int = 5


@dataclass
class InitConfig:
    """Where the weights and architecture come from.

    hf_config: a Hugging Face model dir (or its config.json): the ``model`` section is derived from it,
        keys given under ``model`` override it. checkpoint: a Megatron checkpoint (for example written by
        ``tools/convert_hf_to_megatron.py``) whose weights start the run; None starts from random weights.
    """

    hf_config: str | None = None
    checkpoint: str | None = None


@dataclass
class DataConfig:
    """train_files / eval_files: JSONL or Parquet prompt files (schema in docs/data.md).

    tokenizer: a Hugging Face tokenizer dir or a sentencepiece ``.model`` file. chat_template_kwargs: extra
    variables of the chat template (e.g. Qwen3's ``enable_thinking: false``). fields: column renames,
    e.g. ``{prompt: question}``. max_skipped_fraction: malformed rows allowed before the run stops.
    max_prompt_tokens: longer prompts are an error (they would not fit ``model.seq_length``).
    use_chat_template: wrap each prompt in the tokenizer's chat template (chat / instruct models).
    shuffle: visit the training prompts in a new seeded order every epoch (false: file order).
    """

    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    use_chat_template: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    max_skipped_fraction: float = 0.0
    shuffle: bool = True
    max_prompt_tokens: int = 256


@dataclass
class RolloutConfig:
    """engine: ``hf`` (transformers generate, CPU default), ``vllm`` (GPU default) or ``auto``.
    n: on-policy responses per prompt (GFT's n_rollout).
    The next keys are for vLLM only (docs/rollout.md, docs/cluster.md).
    tensor_parallel_size: the rollout TP; each data-parallel replica's engine runs on that replica's own
    GPUs, so it must be <= the replica's GPUs on a node (TP x PP x CP ranks there).
    gpu_memory_utilization: the engine's share of a GPU's memory (weights, activations, KV cache) while
    awake.
    kv_cache_bytes: a fixed KV-cache size per GPU instead (vLLM's ``kv_cache_memory_bytes``); then
    gpu_memory_utilization is not used.
    sleep_during_training: the colocated engine frees its GPU memory while the trainer trains.
    sleep_level: 2 drops the engine's weights while asleep (every wake is followed by a weight update, so
    copying them to the host, level 1, is wasted work), 1 keeps them in host memory.
    offload_training_states: gradient buffers and optimizer state go to host memory while the engine is
    awake (:mod:`gift_megatron.megatron.offload`). None: on when the engine shares the GPUs (vLLM on CUDA).
    enforce_eager: no CUDA graphs in vLLM (False: faster decoding, more memory and start-up time).
    temperature: sampling temperature (0: greedy); the trainer's log-probs use the same temperature.
    top_p: nucleus sampling, in (0, 1]. max_tokens: most new tokens per response.
    sync_bucket_mb: size of the buckets in which updated weights are streamed to the rollout engine (MiB).
    """

    engine: str = _choice("auto", "hf", "vllm")
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    kv_cache_bytes: int | None = None
    sleep_during_training: bool = True
    sleep_level: int = 2
    offload_training_states: bool | None = None
    enforce_eager: bool = True
    sync_bucket_mb: int = 512

    def __post_init__(self) -> None:
        _check_choices(self, "rollout")


@dataclass
class GroupsConfig:
    """GFT hybrid groups (docs/objectives.md, GFT): dataset expert demonstrations and teacher responses added
    to every group next to the ``rollout.n`` on-policy members. None: the objective's default (GFT: 1 expert,
    3 teachers; every other objective: 0).

    n_expert: expert demonstrations per group (the dataset's ``expert`` field; sft and dft default to 1).
    n_teacher: teacher responses per group (from the dataset's ``teachers`` list).
    """

    n_expert: int | None = None
    n_teacher: int | None = None


@dataclass
class RewardConfig:
    """name: ``math_verify`` | ``exact_match`` | ``toy`` | ``reward_model:PATH`` | ``package.module:function``;
    options: keyword arguments of that reward."""

    name: str = "math_verify"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    """name: a registered objective (gift, gft, grpo, dapo, gspo, sft, dft); options: its options
    (docs/objectives.md), validated by ``gift_megatron.objectives.build_objective``."""

    name: str = "gift"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    """Adam(W) through Megatron's optimizer (distributed optimizer optional), with Megatron's scheduler.

    lr: peak learning rate. min_lr: the floor of the decay. weight_decay: decoupled (AdamW) weight decay.
    adam_beta1: decay of Adam's first moment. adam_beta2: of its second moment. adam_eps: Adam's epsilon
    (added to the root of the second moment). clip_grad: global gradient
    norm clipping (0: off). warmup_steps: optimizer steps of linear warm-up from 0. lr_decay_style: the
    schedule after warm-up, over train.steps x train.updates_per_step optimizer steps.
    use_distributed_optimizer: shard the fp32 main weights and Adam moments over data-parallel ranks.
    """

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    lr_decay_style: str = _choice("constant", "linear", "cosine")
    use_distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        _check_choices(self, "optimizer")


@dataclass
class LoopConfig:
    """steps: optimizer rounds (one rollout batch each). prompts_per_step: prompts per rollout batch, over
    all data-parallel ranks. updates_per_step: optimizer steps per rollout batch (mini-batches of whole
    groups). micro_batch_size: members per micro-batch, each a row padded to the step's longest sequence
    (default 4 when micro_batch_tokens is not set). micro_batch_tokens: the alternative: a token budget per
    micro-batch; members are packed end to end into rows of at most this many tokens (Megatron-Core's THD
    format), balanced over data-parallel ranks, a group kept in one row when it fits (see README,
    "Packed sequences"). eval_interval: steps between greedy evaluations on
    ``data.eval_files`` (0: only at the start and the end); eval_prompts: how many eval prompts.
    logprob_chunk_size: most tokens per block of the fp32 log-prob computation, to bound its memory at
    large vocabularies (None: no bound of its own)."""

    steps: int = 100
    prompts_per_step: int = 32
    updates_per_step: int = 1
    micro_batch_size: int | None = None
    micro_batch_tokens: int | None = None
    eval_interval: int = 0
    eval_prompts: int = 64
    logprob_chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.micro_batch_size is None and self.micro_batch_tokens is None:
            self.micro_batch_size = 4


@dataclass
class TrainConfig:
    """The whole run. Sections mirror the YAML file."""

    run: RunConfig = field(default_factory=RunConfig)
    init: InitConfig = field(default_factory=InitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def group_composition(self) -> tuple[int, int, int]:
        """(n_expert, n_teacher, n_rollout) trained members of every group.

        The objective declares its defaults (``Objective.default_groups``: GFT 1 expert and 3 teachers, the
        supervised baselines 1 expert) and whether it trains on its rollouts (``trains_on_rollouts``: the
        supervised baselines' rollouts are scored for the reward metrics only); ``groups.n_expert`` /
        ``groups.n_teacher`` override the defaults. ConfigError for an unknown ``objective.name``.
        """
        from gift_megatron.objectives import OBJECTIVES

        cls = OBJECTIVES.get(self.objective.name)
        if cls is None:
            raise ConfigError(
                f"objective.name: unknown objective {self.objective.name!r}; registered: {', '.join(sorted(OBJECTIVES))}"
            )
        defaults = cls.default_groups
        n_expert = self.groups.n_expert if self.groups.n_expert is not None else defaults.n_expert
        n_teacher = self.groups.n_teacher if self.groups.n_teacher is not None else defaults.n_teacher
        return n_expert, n_teacher, self.rollout.n if cls.trains_on_rollouts else 0


# --------------------------------------------------------------------------------------------- loading
def _schema() -> DictConfig:
    """``OmegaConf.structured(TrainConfig)``, each section built from its class's field defaults: the default
    factories' instances have run ``__post_init__`` (``LoopConfig()`` has already chosen
    ``micro_batch_size=4``, which would then clash with a file's ``micro_batch_tokens``)."""
    schema = OmegaConf.structured(TrainConfig)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        schema[f.name] = OmegaConf.structured(hints[f.name])
    return schema


def _without_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _annotation(key: str) -> Any:
    """The annotation of the dotted ``key`` (list items as ``key[0]``) in TrainConfig; None if there is none."""
    tp: Any = TrainConfig
    for part in re.findall(r"\[\d+\]|[^.\[\]]+", key):
        tp = _without_none(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if part.startswith("["):
            tp = args[0] if origin is list and args else None
        elif dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
        elif origin is dict:
            tp = args[1] if len(args) == 2 else Any
        else:
            tp = Any if tp is Any else None
        if tp is None:
            return None
    return tp


def _lookup(data: Any, key: str) -> Any:
    """The value at the dotted ``key`` of the mapping ``data``; raises LookupError when there is none."""
    for part in re.findall(r"\[\d+\]|[^.\[\]]+", key):
        if part.startswith("[") and isinstance(data, (list, tuple)):
            data = data[int(part[1:-1])]
        elif isinstance(data, Mapping) and part in data:
            data = data[part]
        else:
            raise LookupError(key)
    return data


_EXPECTED = {bool: "expected true or false", int: "expected an integer", float: "expected a number"}


def _expected(tp: Any) -> str:
    tp = _without_none(tp)
    if tp in _EXPECTED:
        return _EXPECTED[tp]
    if typing.get_origin(tp) is list:
        return "expected a list"
    if typing.get_origin(tp) is dict or dataclasses.is_dataclass(tp):
        return "expected a mapping"
    return "expected a string" if tp is str else f"expected {tp}"


def _misplaced_container(data: Any, prefix: str = "") -> str | None:
    """The dotted key of the first mapping given for a list field or list for a mapping field: OmegaConf's
    error for those ("Cannot merge incompatible container types") carries no key."""
    if not isinstance(data, Mapping):
        return None
    for k, v in data.items():
        key = f"{prefix}{k}"
        tp = _without_none(_annotation(key))
        mapping = typing.get_origin(tp) is dict or dataclasses.is_dataclass(tp)
        if (typing.get_origin(tp) is list and isinstance(v, Mapping)) or (mapping and isinstance(v, (list, tuple))):
            return key
        found = _misplaced_container(v, f"{key}.") if mapping else None
        if found:
            return found
    return None


def _config_error(exc: Exception, data: Any) -> ConfigError:
    """OmegaConf's exception as a ConfigError naming the dotted key (its ``full_key``) as this module words it."""
    key = getattr(exc, "full_key", None) or _misplaced_container(data) or ""
    first = str(exc).split("\n")[0]
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)) and key:
        parent, _, _ = key.rpartition(".")
        section = _without_none(_annotation(parent) if parent else TrainConfig)
        names = [f.name for f in dataclasses.fields(section)] if dataclasses.is_dataclass(section) else []
        known = f" (known keys of {parent or 'the config'}: {', '.join(names)})" if names else ""
        return ConfigError(f"unknown key {key}{known}")
    tp = _annotation(key) if key else None
    if tp is None or tp is Any:
        return ConfigError(f"{key or 'config'}: {first}")
    try:
        value = _lookup(data, key)
    except LookupError:
        return ConfigError(f"{key}: {_expected(tp)} ({first})")
    kind = "" if _without_none(tp) in _EXPECTED or _without_none(tp) is str else f"{type(value).__name__} "
    return ConfigError(f"{key}: {_expected(tp)}, got {kind}{value!r}")


def _apply_override(user: DictConfig, text: str) -> None:
    """Set ``key=value`` on ``user`` (the YAML file's config): the value read with OmegaConf's override grammar
    (``OmegaConf.from_dotlist``), a list field also from ``a,b`` (``data.train_files=a.jsonl,b.jsonl``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (for example train.steps=10)")
    key, raw = text.split("=", 1)
    key = key.strip()
    path = key.split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key segment")
    if not raw.strip():
        value: Any = ""  # key= is the empty string (an empty list for a list field), not null
    else:
        try:
            value = OmegaConf.select(OmegaConf.from_dotlist([f"{key}={raw}"]), key)
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
        if isinstance(value, DictConfig) or OmegaConf.is_list(value):
            value = OmegaConf.to_container(value)
    if isinstance(value, str) and typing.get_origin(_without_none(_annotation(key))) is list:
        value = [v for v in value.split(",") if v]
    # OmegaConf.update would silently turn a scalar on the way (train: 5, then train.steps=3) into a section.
    node: Any = user
    for i, part in enumerate(path[:-1]):
        node = node.get(part) if isinstance(node, DictConfig) else None
        if node is None:
            break
        if not isinstance(node, DictConfig):
            raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
    try:
        # merge=False replaces a mapping: objective.options={} drops the file's options instead of keeping them.
        OmegaConf.update(user, key, value, merge=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override {text!r}: {str(exc).splitlines()[0]}") from exc


def _hf_model_section(path: str) -> dict:
    """ModelConfig fields derived from a Hugging Face config.json (file or model dir), read and checked as the
    checkpoint conversion reads it (:func:`gift_megatron.hf.hf_io.model_config_from_hf`): what conversion
    refuses (MLP biases, sliding-window attention, an unsupported architecture) a run refuses too."""
    from gift_megatron.hf.hf_io import ConversionError, model_config_from_hf, read_hf_config

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"init.hf_config: cannot read {file}: No such file or directory")
    try:
        return dataclasses.asdict(model_config_from_hf(read_hf_config(path), file))
    except ConversionError as exc:
        raise ConfigError(f"init.hf_config: {exc}") from exc


# ModelConfig fields a run may choose freely; every other field is the checkpoint's architecture.
RUN_MODEL_FIELDS = ("seq_length",)


def _conversion_record(checkpoint: str) -> tuple[str, dict] | None:
    """(record file, ModelConfig fields) of the conversion record beside a converted checkpoint (its root,
    or the root above a ``step_*`` directory); None for checkpoints without one (written by a run)."""
    import json

    from gift_megatron.hf.convert import CONVERSION_FILE

    path = os.path.abspath(os.path.expanduser(checkpoint))
    if not os.path.exists(path):
        # Not an error here: a recipe may name a cluster path that this machine does not see. check_inputs
        # (validate, the launchers) and the trainer's checkpoint load report a missing checkpoint.
        return None
    for root in (path, os.path.dirname(path)):
        file = os.path.join(root, CONVERSION_FILE)
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as fh:
                    return file, dict(json.load(fh)["model_config"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"init.checkpoint: conversion record {file} is unreadable ({exc})") from exc
    return None


def _model_from_checkpoint(data: dict) -> None:
    """With ``init.checkpoint`` set, the model section comes from the checkpoint's conversion record; keys
    the config gives must agree with it (except the run's own ``seq_length``): a wrong rotary base or norm
    epsilon would otherwise train silently on a different model."""
    init = data.get("init") if isinstance(data.get("init"), dict) else {}
    checkpoint = init.get("checkpoint")
    if not checkpoint or not isinstance(checkpoint, str):
        return
    found = _conversion_record(checkpoint)
    if found is None:
        return
    file, record = found
    given = data.get("model") or {}
    if not isinstance(given, dict):
        return  # _build reports the malformed section
    differ = []
    for key, value in given.items():
        if key in RUN_MODEL_FIELDS or key not in record:
            continue
        same = value == record[key] or (
            isinstance(value, (int, float))
            and isinstance(record[key], (int, float))
            and not isinstance(value, bool)
            and float(value) == float(record[key])
        )
        if not same:
            differ.append(f"model.{key}={value!r} (checkpoint: {record[key]!r})")
    if differ:
        raise ConfigError(
            f"the model section contradicts the architecture of init.checkpoint ({file}): "
            f"{'; '.join(differ)}. Remove these keys to use the checkpoint's, or convert the right "
            "model"
        )
    data["model"] = {**record, **given}


def _sections(data: Mapping) -> dict:
    """``data`` with an empty section (``run:`` with nothing under it, None) as {}; a section that is not a
    mapping is a ConfigError (OmegaConf's merge error would not name it)."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for k, v in data.items():
        if k in hints and v is None:
            v = {}
        elif k in hints and not isinstance(v, Mapping) and not dataclasses.is_dataclass(v):
            raise ConfigError(f"{k}: expected a mapping, got {type(v).__name__} {v!r}")
        out[k] = v
    return out


def config_from_dict(data: Mapping, *, source: str = "") -> TrainConfig:
    """A validated TrainConfig from a mapping (the YAML document after overrides)."""
    try:
        data = _sections(data or {})
        init = data.get("init")
        hf = init.get("hf_config") if isinstance(init, Mapping) else None
        if hf:
            model = data.get("model")
            data["model"] = {**_hf_model_section(hf), **(model if isinstance(model, Mapping) else {})}
        _model_from_checkpoint(data)
        try:
            merged = OmegaConf.merge(_schema(), data)
        except (OmegaConfBaseException, TypeError) as exc:  # TypeError: a list given for a mapping, or the reverse
            raise _config_error(exc, data) from None
        try:
            cfg = OmegaConf.to_object(merged)
        except OmegaConfBaseException as exc:
            raise _config_error(exc, data) from None
        except (ValueError, TypeError) as exc:  # a __post_init__ check; its message names the key
            raise ConfigError(str(exc)) from exc
        assert isinstance(cfg, TrainConfig)
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None
    return cfg


def load_config(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load ``path`` (YAML), apply dotted ``overrides`` and validate; ConfigError names file and key."""
    path = os.fspath(path)
    try:
        user = OmegaConf.load(path)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {exc}") from exc
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config file {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(user, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(user).__name__}")
    try:
        for text in overrides:
            _apply_override(user, text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    data = OmegaConf.to_container(user)
    assert isinstance(data, dict)
    return config_from_dict(data, source=path)


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)
    os.replace(tmp, path)


def _check_token_budget(cfg: TrainConfig) -> None:
    """train.micro_batch_tokens holds a member of full length, padded as the layout needs."""
    from gift_megatron.parallel.packing import pad_multiple

    budget, p = cfg.train.micro_batch_tokens, cfg.parallel
    assert budget is not None  # validate() calls this only with a token budget
    multiple = pad_multiple(p.tensor_model_parallel_size, p.context_parallel_size, p.sequence_parallel)
    if budget < 1 or budget % multiple:
        raise ConfigError(
            f"train.micro_batch_tokens ({budget}) must be a positive multiple of {multiple}: every "
            "packed sequence is padded to a multiple of 2 x parallel.context_parallel_size (times "
            "tensor_model_parallel_size with sequence parallelism)"
        )
    longest = -(-cfg.model.seq_length // multiple) * multiple
    if budget < longest:
        raise ConfigError(
            f"train.micro_batch_tokens ({budget}) is smaller than a member of model.seq_length "
            f"({cfg.model.seq_length}) tokens padded to a multiple of {multiple} ({longest}); raise the "
            "budget or lower model.seq_length"
        )


def validate(cfg: TrainConfig) -> None:
    """Checks across sections that need no world size (``check_world_size`` does the layout)."""
    from gift_megatron.objectives import OBJECTIVES, build_objective

    t, r = cfg.train, cfg.rollout
    if t.micro_batch_size is not None and t.micro_batch_tokens is not None:
        raise ConfigError(
            f"train.micro_batch_size ({t.micro_batch_size}) and train.micro_batch_tokens "
            f"({t.micro_batch_tokens}) are both set; set one (rows per micro-batch, or a token budget "
            "for packed micro-batches), e.g. train.micro_batch_size=null"
        )
    if t.micro_batch_tokens is not None:
        _check_token_budget(cfg)
    for key, value in (
        ("train.steps", t.steps),
        ("train.prompts_per_step", t.prompts_per_step),
        ("train.updates_per_step", t.updates_per_step),
        ("train.micro_batch_size", t.micro_batch_size or 1),
        ("rollout.n", r.n),
        ("rollout.max_tokens", r.max_tokens),
        ("rollout.tensor_parallel_size", r.tensor_parallel_size),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if cfg.run.save_interval < 0 or cfg.run.log_interval < 1:
        raise ConfigError("run.save_interval must be >= 0 and run.log_interval >= 1")
    if cfg.run.warn_degenerate_steps < 0:
        raise ConfigError(f"run.warn_degenerate_steps must be >= 0, got {cfg.run.warn_degenerate_steps}")
    if cfg.run.resume not in ("none", "auto") and not os.path.exists(cfg.run.resume):
        raise ConfigError(f"run.resume: expected none, auto or an existing checkpoint path, got {cfg.run.resume!r}")
    if cfg.objective.name not in OBJECTIVES:
        raise ConfigError(
            f"objective.name: unknown objective {cfg.objective.name!r}; registered: {', '.join(sorted(OBJECTIVES))}"
        )
    try:
        objective = build_objective(cfg.objective.name, **cfg.objective.options)
    except (ValueError, TypeError) as exc:
        hint = ""
        if "unknown option" in str(exc):
            # The usual cause: objective.name switched on the command line, the file's options kept.
            hint = (
                f" (if objective.name was switched to {cfg.objective.name!r} on the command line, the file's "
                "options belong to the previous objective: reset them with objective.options={} or give "
                f"{cfg.objective.name}'s own)"
            )
        raise ConfigError(f"objective.options: {exc}{hint}") from exc
    n_expert, n_teacher, n_rollout = cfg.group_composition()
    if min(n_expert, n_teacher) < 0:
        raise ConfigError("groups.n_expert and groups.n_teacher must be >= 0")
    group = n_expert + n_teacher + n_rollout
    if group < 1:
        raise ConfigError(
            f"objective {objective.name}: a group has no trained member (groups.n_expert={n_expert}, "
            f"groups.n_teacher={n_teacher})"
        )
    if objective.group_relative and group < 2:
        raise ConfigError(
            f"objective {objective.name} compares members of a group, but a group has {group} member "
            f"(rollout.n={n_rollout}, groups.n_expert={n_expert}, groups.n_teacher={n_teacher}): "
            "set rollout.n >= 2"
        )
    if (t.prompts_per_step * group) % t.updates_per_step:
        raise ConfigError(
            f"train.updates_per_step ({t.updates_per_step}) must divide train.prompts_per_step "
            f"({t.prompts_per_step}) so every mini-batch holds whole groups"
        )
    if not 0 <= cfg.data.max_skipped_fraction <= 1:
        raise ConfigError(f"data.max_skipped_fraction must be in [0, 1], got {cfg.data.max_skipped_fraction}")
    if not 0 < r.top_p <= 1 or r.temperature < 0:
        raise ConfigError("rollout.top_p must be in (0, 1] and rollout.temperature >= 0")
    if cfg.model.seq_length > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"model.seq_length ({cfg.model.seq_length}) exceeds model.max_position_embeddings "
            f"({cfg.model.max_position_embeddings}), the positions the model was trained for"
        )
    if not 0 < r.gpu_memory_utilization <= 1:
        raise ConfigError(f"rollout.gpu_memory_utilization must be in (0, 1], got {r.gpu_memory_utilization}")
    if r.kv_cache_bytes is not None and r.kv_cache_bytes <= 0:
        raise ConfigError(f"rollout.kv_cache_bytes must be > 0 (bytes of KV cache per GPU), got {r.kv_cache_bytes}")
    if r.sleep_level not in (1, 2):
        raise ConfigError(
            f"rollout.sleep_level must be 1 (weights kept in host memory) or 2 (weights dropped), got {r.sleep_level}"
        )
    if cfg.data.max_prompt_tokens + r.max_tokens > cfg.model.seq_length:
        raise ConfigError(
            f"data.max_prompt_tokens ({cfg.data.max_prompt_tokens}) + rollout.max_tokens "
            f"({r.max_tokens}) exceeds model.seq_length ({cfg.model.seq_length})"
        )


def check_inputs(cfg: TrainConfig, paths: bool = True) -> None:
    """What a job would otherwise find missing only once it starts on the cluster: the checkpoint, data and
    tokenizer paths, the reward (name, options, reward-model folder, user function). ConfigError naming the
    key. Run by ``gift-megatron validate`` and by the launchers before anything is submitted; reads no
    weights and loads no model. ``paths=False`` checks the reward only (for a machine that does not see the
    job's filesystems).
    """
    from gift_megatron.rewards import check_reward

    if not paths:
        try:
            if not cfg.reward.name.startswith("reward_model:"):  # a reward model is a path too
                check_reward(cfg.reward.name, **cfg.reward.options)
        except ValueError as exc:
            raise ConfigError(f"reward.name / reward.options: {exc}") from None
        return
    if cfg.init.checkpoint:
        from gift_megatron.hf.convert import ConversionError, resolve_checkpoint

        try:
            resolve_checkpoint(os.path.expanduser(cfg.init.checkpoint))
        except ConversionError as exc:
            raise ConfigError(f"init.checkpoint: {exc}") from None
    for key, files in (("data.train_files", cfg.data.train_files), ("data.eval_files", cfg.data.eval_files)):
        for f in files:
            if not os.path.isfile(os.path.expanduser(f)):
                raise ConfigError(f"{key}: {f} does not exist")
    if not cfg.data.train_files:
        raise ConfigError("data.train_files: no prompt file given")
    tokenizer = cfg.data.tokenizer or cfg.init.hf_config
    if tokenizer is None:
        raise ConfigError("data.tokenizer: no tokenizer given (and no init.hf_config dir to take it from)")
    if not os.path.exists(os.path.expanduser(tokenizer)):
        raise ConfigError(f"data.tokenizer: {tokenizer} does not exist")
    try:
        check_reward(cfg.reward.name, **cfg.reward.options)
    except ValueError as exc:
        raise ConfigError(f"reward.name / reward.options: {exc}") from None


def offload_enabled(cfg: TrainConfig, cuda: bool | None = None) -> bool:
    """``rollout.offload_training_states`` resolved: None means on when the vLLM engine shares the trainer's
    GPUs (``rollout.engine`` vllm, or auto, on CUDA; ``cuda`` defaults to this process's device choice,
    :func:`gift_megatron.device.use_cuda`)."""
    r = cfg.rollout
    if r.offload_training_states is not None:
        return r.offload_training_states
    if cuda is None:
        from gift_megatron.device import use_cuda

        cuda = use_cuda()
    return cuda and r.engine in ("auto", "vllm")


def check_world_size(cfg: TrainConfig, world_size: int, gpus_per_node: int | None = None) -> int:
    """The data-parallel size of ``cfg`` on ``world_size`` ranks, or ConfigError naming the numbers: the
    layout must fit the world, and every data-parallel rank must get whole micro-batches of whole groups.
    With ``gpus_per_node`` (ranks per node) and a vLLM engine, every replica's engine must also fit its
    replica's GPUs (:func:`gift_megatron.rollout.placement.check_layout`)."""
    try:
        dp = cfg.parallel.validate(world_size, cfg.model)
    except ValueError as exc:
        raise ConfigError(f"{exc} (world size {world_size})") from exc
    if gpus_per_node and cfg.rollout.engine in ("auto", "vllm"):
        from gift_megatron.rollout.placement import PlacementError, check_layout

        p = cfg.parallel
        try:
            check_layout(
                world_size,
                gpus_per_node,
                p.tensor_model_parallel_size,
                p.pipeline_model_parallel_size,
                p.context_parallel_size,
                cfg.rollout.tensor_parallel_size,
            )
        except PlacementError as exc:
            raise ConfigError(
                f"{exc} (world size {world_size}, {min(gpus_per_node, world_size)} GPUs per node)"
            ) from exc
    t = cfg.train
    n_expert, n_teacher, n_rollout = cfg.group_composition()
    group = n_expert + n_teacher + n_rollout
    if t.prompts_per_step % (dp * t.updates_per_step):
        raise ConfigError(
            f"train.prompts_per_step ({t.prompts_per_step}) must be a multiple of data-parallel size "
            f"({dp}) x train.updates_per_step ({t.updates_per_step})"
        )
    per_rank = t.prompts_per_step // (dp * t.updates_per_step) * group
    if t.micro_batch_size is not None and per_rank % t.micro_batch_size:
        raise ConfigError(
            f"each data-parallel rank gets {per_rank} members per update ({t.prompts_per_step} prompts "
            f"x {group} members / {dp} ranks / {t.updates_per_step} updates), not a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size})"
        )
    return dp
