"""``build_reward``: a reward function from a config's ``reward`` section (a name or spec and options)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gift_megatron.rewards.base import RewardError, RewardFunction, RewardInput, show_sample
from gift_megatron.rewards.verifiers import ExactMatch, MathVerify, ToyReward

BUILTIN: dict[str, type] = {"math_verify": MathVerify, "exact_match": ExactMatch, "toy": ToyReward}
CHOICES = f"{sorted(BUILTIN)}, reward_model:PATH, package.module:function or path/to/file.py:function"


class UserFunction:
    """A user's reward function wrapped as a RewardFunction.

    Batch mode (default): ``fn(samples, **options)`` gets the batch's list of RewardInput and returns one
    float per sample (so it can batch its own work, e.g. call a service once). ``per_sample=True``:
    ``fn(prompt, response, answer, **options)`` is called once per sample and returns a float.
    An exception inside ``fn`` becomes a RewardError naming the spec (and the sample, per sample).
    """

    def __init__(self, fn: Callable, spec: str, *, per_sample: bool = False, options: Mapping[str, Any] | None = None):
        self.fn, self.spec, self.per_sample, self.options = fn, spec, per_sample, dict(options or {})

    def __call__(self, samples: Sequence[RewardInput]) -> list[float]:
        if self.per_sample:
            out = []
            for s in samples:
                try:
                    out.append(self.fn(s.prompt, s.response, s.answer, **self.options))
                except Exception as exc:
                    raise RewardError(
                        f"reward {self.spec} failed ({type(exc).__name__}: {exc}) on {show_sample(s)}"
                    ) from exc
            return out
        try:
            values = self.fn(list(samples), **self.options)
        except Exception as exc:
            raise RewardError(
                f"reward {self.spec} failed on a batch of {len(samples)} samples ({type(exc).__name__}: {exc})"
            ) from exc
        try:
            return list(values)
        except TypeError:
            raise RewardError(
                f"reward {self.spec} returned {type(values).__name__}; a batch reward function "
                "returns one float per sample (or set per_sample: true)"
            ) from None


def _import_function(spec: str) -> Callable:
    """``package.module:function`` or ``path/to/file.py:function`` (attributes may be dotted: ``mod:Class.fn``)."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {spec}: expected package.module:function")
    if module_name.endswith(".py"):
        path = os.path.abspath(os.path.expanduser(module_name))
        if not os.path.isfile(path):
            raise ValueError(f"reward {spec}: no such file {path}")
        name = "gift_megatron_user_reward_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"reward {spec}: {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # so the function's objects pickle and dataclasses resolve their module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ValueError(f"reward {spec}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"reward {spec}: cannot import module {module_name!r}: {exc}") from exc
        except Exception as exc:  # the module itself raised while importing
            raise ValueError(f"reward {spec}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {spec}: {attr!r} is not callable (it is a {type(obj).__name__})")
    return obj


def _split_spec(spec: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(name or callable, options) from a string, a callable or a mapping ``{name, options?, **more_options}``."""
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"reward: a reward mapping needs a 'name', got keys {sorted(spec)}")
        nested = spec.pop("options", None) or {}
        if not isinstance(nested, Mapping):
            raise ValueError(f"reward {spec['name']}: options must be a mapping, got {type(nested).__name__}")
        name = spec.pop("name")
        return name, {**nested, **spec, **options}
    return spec, dict(options)


def build_reward(spec: str | Mapping[str, Any] | Callable, **options: Any) -> RewardFunction:
    """The reward function named by ``spec``, configured with ``options``.

    spec: ``"math_verify"``, ``"exact_match"``, ``"toy"``, ``"reward_model:PATH"``, ``"package.module:function"``
    or ``"path/to/file.py:function"``; or a mapping ``{"name": spec, "options": {...}}`` (options may also
    sit beside ``name``); or a callable, wrapped like a user function. Errors name the spec and list the
    choices.
    """
    name, options = _split_spec(spec, options)
    if callable(name) and not isinstance(name, str):
        per_sample = bool(options.pop("per_sample", False))
        return UserFunction(name, getattr(name, "__qualname__", repr(name)), per_sample=per_sample, options=options)
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward: the name must be a non-empty string, got {name!r}; choose one of {CHOICES}")
    if name in BUILTIN:
        return _construct(BUILTIN[name], name, options)
    if name.startswith("reward_model:"):
        from gift_megatron.rewards.reward_model import RewardModel

        path = name.split(":", 1)[1]
        if not path:
            raise ValueError("reward reward_model:PATH: the path is empty")
        return _construct(RewardModel, name, options, path)
    if ":" in name:
        fn = _import_function(name)
        per_sample = bool(options.pop("per_sample", False))
        return UserFunction(fn, name, per_sample=per_sample, options=options)
    raise ValueError(f"reward: unknown reward {name!r}; choose one of {CHOICES}")


def check_reward(spec: str | Mapping[str, Any], **options: Any) -> None:
    """Raise ValueError (as :func:`build_reward` would) for an unknown reward, bad options, a missing reward
    model folder or a user function that does not import, without loading any model: the pre-launch
    check of ``gift-megatron validate`` and the launchers."""
    name, options = _split_spec(spec, options)
    if isinstance(name, str) and name.startswith("reward_model:"):
        from gift_megatron.rewards.reward_model import RewardModel

        path = name.split(":", 1)[1]
        if not path:
            raise ValueError("reward reward_model:PATH: the path is empty")
        _check_options(RewardModel, name, options, path)
        if not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
            raise ValueError(f"reward {name}: {path} is not a model folder (no config.json)")
        return
    build_reward(name, **options)  # built-ins and user functions are cheap to build


def _check_options(cls: type, name: str, options: dict[str, Any], *args: Any) -> None:
    try:
        inspect.signature(cls).bind(*args, **options)
    except TypeError as exc:
        accepted = [p for p in inspect.signature(cls).parameters if p != "path"]
        raise ValueError(f"reward {name}: bad options {options}: {exc}; accepted: {accepted}") from None


def _construct(cls: type, name: str, options: dict[str, Any], *args: Any) -> Any:
    # Check the options against the signature first, so a typo is reported as such rather than as whatever
    # TypeError the constructor's body might raise.
    _check_options(cls, name, options, *args)
    return cls(*args, **options)
