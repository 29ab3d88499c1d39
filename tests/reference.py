"""Naive reference implementations written straight from docs/objectives.md, for tests only.

They loop over groups with torch.mean / torch.std on whole tensors, keep every gradient path autograd gives
(so detach_stats=False is the true derivative), and share no code with gift_megatron.objectives.
"""

from __future__ import annotations

import torch


def zscore(x: torch.Tensor, gid: torch.Tensor, eps: float = 1e-6, unbiased: bool = True, detach: bool = False):
    out = torch.zeros_like(x)
    for g in gid.unique().tolist():
        idx = (gid == g).nonzero().flatten()
        v = x[idx]
        if len(idx) == 1:
            mean, std = v.mean(), torch.ones(())
        else:
            mean = v.mean()
            std = v.std(unbiased=unbiased) if bool(v.detach().std() > 0) else (v - v).sum()  # 0, no NaN grad
        if detach:
            mean, std = mean.detach(), std.detach()
        out = out.index_put((idx,), (v - mean) / (std + eps))
    return out


def gift(
    lp, rlp, m, R, gid, beta=1.0, eps=1e-6, detach_stats=True, implicit_reward="sum", std_floor=0.0, unbiased=True
):
    u = ((lp - rlp) * m).sum(1)
    if implicit_reward == "mean":
        u = u / m.sum(1)
    A = zscore(R, gid, eps, unbiased).detach()
    z = torch.zeros_like(u)
    for g in gid.unique().tolist():
        idx = (gid == g).nonzero().flatten()
        v = u[idx]
        if len(idx) == 1:
            mean, std = v.detach(), torch.ones(())  # own value: z is exactly 0
        else:
            mean = v.mean()
            raw = v.std(unbiased=unbiased) if bool(v.detach().std() > 0) else (v - v).sum()
            std = torch.clamp(raw, min=std_floor) if std_floor > 0 else raw
        if detach_stats:
            mean, std = mean.detach(), std.detach()
        z = z.index_put((idx,), (v - mean) / (std + eps))
    return ((A - beta * z) ** 2).mean()


def gft(lp, m, R, gid, tau=0.1, eps=1e-6):
    A = zscore(R, gid, eps).detach()
    p = lp.detach().exp()
    c = torch.where(p <= tau, p, torch.ones_like(p))
    return (-(A[:, None] * c * lp) * m).sum() / m.sum()


def grpo(
    lp, olp, m, R, gid, rlp=None, eps_low=0.2, eps_high=0.2, kl_coef=0.0, aggregation="seq_mean_token_mean", eps=1e-6
):
    A = zscore(R, gid, eps).detach()[:, None]
    r = (lp - olp).exp()
    l = -torch.min(r * A, r.clamp(1 - eps_low, 1 + eps_high) * A)
    if kl_coef:
        d = rlp - lp
        l = l + kl_coef * (d.exp() - d - 1)
    if aggregation == "token_mean":
        return (l * m).sum() / m.sum()
    return ((l * m).sum(1) / m.sum(1)).mean()


def gspo(lp, olp, m, R, gid, eps_low=3e-4, eps_high=4e-4, eps=1e-6):
    A = zscore(R, gid, eps).detach()
    s = (((lp - olp) * m).sum(1) / m.sum(1)).exp()
    return (-torch.min(s * A, s.clamp(1 - eps_low, 1 + eps_high) * A)).mean()


def sft(lp, m):
    return (-lp * m).sum() / m.sum()


def dft(lp, m):
    return (-lp.detach().exp() * lp * m).sum() / m.sum()
