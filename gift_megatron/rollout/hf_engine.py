"""The CPU rollout engine: Hugging Face transformers' ``generate``, fed by the same weight stream as vLLM.

Used where vLLM cannot run (CPU machines, CI) and as a reference for the vLLM adapter. Sampling is done
by transformers (temperature, top-p); the log-prob of every generated token is recomputed from the logits
``generate`` returns, as log softmax(logits / temperature) before top-p (see SamplingParams).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from gift_megatron.rollout.base import Rollout, SamplingParams


class HFRolloutEngine:
    """A rollout engine around a transformers causal LM (``model``), on its current device.

    ``pad_token_id`` / ``eos_token_id`` default to the model's generation config.
    """

    def __init__(self, model, *, eos_token_id: int | None = None, pad_token_id: int | None = None) -> None:
        self.model = model.eval()
        gen = model.generation_config
        self.eos_token_id = eos_token_id if eos_token_id is not None else gen.eos_token_id
        pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0)
        self._views: dict[str, tuple[str, torch.Tensor]] | None = None  # built at the first update

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Rollout]:
        if not prompts:
            raise ValueError("prompts: empty list")
        device = next(self.model.parameters()).device
        # transformers samples from the global generator; fork it so that a seeded rollout does not reset
        # the training process's own random stream (dropout, shuffles) to a function of the rollout seed.
        cuda = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )
        with torch.random.fork_rng(devices=cuda, enabled=params.seed is not None):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            return self._generate(prompts, params, device)

    def _generate(self, prompts, params: SamplingParams, device: torch.device) -> list[Rollout]:
        out: list[Rollout] = []
        for index, prompt in enumerate(prompts):  # one prompt at a time: no padding, exact positions
            if len(prompt) == 0:
                raise ValueError(f"prompts[{index}] is empty")
            ids = torch.tensor([list(prompt)] * params.n, dtype=torch.long, device=device)
            greedy = params.temperature == 0
            result = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=not greedy,
                temperature=None if greedy else params.temperature,
                top_p=None if greedy else params.top_p,
                top_k=None,
                max_new_tokens=params.max_tokens,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
            new = result.sequences[:, ids.shape[1] :]
            logits = torch.stack(result.logits, dim=1).float()  # [n, T, V], raw (before processors)
            if not greedy:
                logits = logits / params.temperature
            lp = torch.log_softmax(logits, -1).gather(-1, new[..., None])[..., 0]
            # One copy to the host per prompt; the per-response slicing below then never waits on a device.
            new, lp, prompt_ids = new.cpu(), lp.cpu(), ids[0].cpu()
            for row in range(params.n):
                length, finished = new.shape[1], False
                if self.eos_token_id is not None:
                    hits = (new[row] == self.eos_token_id).nonzero()
                    if hits.numel():
                        length, finished = int(hits[0]) + 1, True
                out.append(Rollout(index, prompt_ids.clone(), new[row, :length], lp[row, :length], finished))
        return out

    def _expert_views(self) -> dict[str, tuple[str, torch.Tensor]]:
        """Hugging Face on-disk name -> (parameter name, view of it) for Mixture-of-Experts weights that
        transformers holds fused in memory (transformers 5: ``mlp.experts.gate_up_proj`` [E, 2*I, h] and
        ``down_proj`` [E, h, I]; Mixtral's ``mlp.gate`` is ``block_sparse_moe.gate`` on disk), for the
        families of :mod:`gift_megatron.hf.mapping`. The weight stream (``iter_hf_weights``) uses the
        on-disk names, one tensor per expert. Empty for a dense model or another architecture."""
        cached = getattr(self, "_views", None)
        if cached is not None:
            return cached
        from gift_megatron.hf.mapping import fused_hf_names
        from gift_megatron.megatron.model import ModelConfig

        self._views = {}
        try:
            cfg = ModelConfig.from_hf_config(self.model.config)
        except (ValueError, KeyError, TypeError):
            return self._views
        for pname, p in self.model.named_parameters():
            names = fused_hf_names(pname, cfg)
            if names is None:
                continue
            if pname.endswith("gate_up_proj"):
                width = p.shape[1] // 2
                views = [v for e in range(p.shape[0]) for v in (p[e, :width], p[e, width:])]
            elif pname.endswith("down_proj"):
                views = list(p.unbind(0))
            else:  # Mixtral's router: the same tensor under its on-disk name
                views = [p]
            self._views.update({n: (pname, v) for n, v in zip(names, views)})
        return self._views

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (Hugging Face name, full tensor) pairs into the model: its own parameter names, or the on-disk
        per-expert names of experts it holds fused (see :meth:`_expert_views`). Every parameter must come."""
        params = dict(self.model.named_parameters())
        params.update({k: v for k, v in self.model.named_buffers() if k not in params})
        views = self._expert_views()
        seen = set()
        for name, tensor in named_tensors:
            if name in params:
                target = params[name]
            elif name in views:
                target = views[name][1]
            else:
                raise ValueError(
                    f"update_weights: {name!r} is not a parameter of the rollout model ({type(self.model).__name__})"
                )
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"update_weights: {name!r} has shape {list(tensor.shape)}, the rollout model "
                    f"expects {list(target.shape)}"
                )
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            seen.add(name)
        # A fused expert parameter is complete when it came whole or every one of its experts came.
        parts: dict[str, list[str]] = {}
        for name, (pname, _) in views.items():
            parts.setdefault(pname, []).append(name)
        seen |= {pname for pname, names in parts.items() if all(n in seen for n in names)}
        # A tied lm_head is the embedding: it is updated through it, whichever name the stream used.
        missing = [n for n, _ in self.model.named_parameters() if n not in seen]
        if missing and seen:
            tied = getattr(self.model.config, "tie_word_embeddings", False)
            missing = [n for n in missing if not (tied and n == "lm_head.weight")]
            if missing:
                raise ValueError(
                    f"update_weights: the stream had no tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                )

    def sleep(self) -> None:  # nothing to release on CPU
        pass

    def wake(self) -> None:
        pass
