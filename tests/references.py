"""Slow, obvious references for every built-in variant, written from the method as docs/method.md states it.

Each takes a built layer (for its weights and options) and x of shape (B, N, C) and computes the
layer's output token by token, head by head, with no cleverness. They are differentiable, so
tests compare forward outputs and gradients with the fast path.
"""
from __future__ import annotations

import math

import torch


def _heads(layer, x):
    """q, k, v as nested per-(batch, head) lists of (N, d) tensors, after qk_norm."""
    B, N, C = x.shape
    h, d = layer.num_heads, layer.head_dim
    qkv = x @ layer.qkv.weight.T
    if layer.qkv.bias is not None:
        qkv = qkv + layer.qkv.bias
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    def split(t):
        return [[t[b, :, i * d:(i + 1) * d] for i in range(h)] for b in range(B)]
    q, k = split(q), split(k)
    q = [[layer.q_norm(t) for t in row] for row in q]
    k = [[layer.k_norm(t) for t in row] for row in k]
    return q, k, split(v)


def _merge_and_project(layer, per_head):
    """per_head[b][i] of shape (N, d) -> proj(concat over heads)."""
    merged = torch.stack([torch.cat(row, dim=-1) for row in per_head])
    return layer.proj(layer.norm(merged))


def _unit(t, eps):
    """t / max(|t|, eps); at the floor t passes no gradient (attnbench_variants.ops.norms)."""
    norm = t.norm()
    return t / norm if norm > eps else t.detach() / eps


def softmax(layer, x):
    q, k, v = _heads(layer, x)
    out = []
    for qb, kb, vb in zip(q, k, v):
        row = []
        for qi, ki, vi in zip(qb, kb, vb):
            scores = torch.stack([torch.stack([qi[n] @ ki[m] for m in range(len(ki))]) for n in range(len(qi))])
            weights = torch.exp(scores / math.sqrt(qi.shape[-1]))
            weights = weights / weights.sum(dim=-1, keepdim=True)
            row.append(weights @ vi)
        out.append(row)
    return _merge_and_project(layer, out)


def linear(layer, x):
    o = layer.options
    phi = (lambda t: torch.relu(t)) if o.feature_map == "relu" else (lambda t: torch.where(t > 0, t + 1, torch.exp(t)))
    q, k, v = _heads(layer, x)
    out = []
    for qb, kb, vb in zip(q, k, v):
        row = []
        for qi, ki, vi in zip(qb, kb, vb):
            tokens = []
            for n in range(len(qi)):
                sims = [phi(qi[n]) @ phi(ki[m]) for m in range(len(ki))]
                numerator = sum(s * vi[m] for m, s in enumerate(sims))
                tokens.append(numerator / (sum(sims) + o.eps))
            row.append(torch.stack(tokens))
        out.append(row)
    return _merge_and_project(layer, out)


def angular_similarity(cos, order):
    if order == 0:
        return 1 - torch.arccos(torch.clamp(cos, -1 + 1e-6, 1 - 1e-6)) / math.pi
    total = 0.5 + cos / math.pi
    for i in range(1, (order - 1) // 2 + 1):
        c_i = math.factorial(2 * i) / (4 ** i * math.factorial(i) ** 2 * (2 * i + 1))
        total = total + c_i * cos ** (2 * i + 1) / math.pi
    return total


def angular(layer, x):
    o = layer.options
    q, k, v = _heads(layer, x)
    out = []
    for qb, kb, vb in zip(q, k, v):
        row = []
        for qi, ki, vi in zip(qb, kb, vb):
            tokens = []
            for n in range(len(qi)):
                sims = [angular_similarity(_unit(qi[n], o.eps) @ _unit(ki[m], o.eps), o.order) for m in range(len(ki))]
                tokens.append(sum(s * vi[m] for m, s in enumerate(sims)) / sum(sims))
            row.append(torch.stack(tokens))
        out.append(row)
    return _merge_and_project(layer, out)


def _dwconv_tokens(weight_taps, vi):
    """Zero-padded 1-D filter along tokens, shared over channels: c_n = sum_t w_t v_{n+t-K//2}."""
    size = len(weight_taps)
    tokens = []
    for n in range(len(vi)):
        acc = torch.zeros_like(vi[0])
        for t in range(size):
            m = n + t - size // 2
            if 0 <= m < len(vi):
                acc = acc + weight_taps[t] * vi[m]
        tokens.append(acc)
    return torch.stack(tokens)


def _dwconv_grid(layer, head, vi):
    """3x3 (grid_kernel_size) depthwise conv over the square token grid, per channel; prefix tokens get 0."""
    N, d = vi.shape
    prefix, side = layer.token_grid(N)
    size = layer.options.grid_kernel_size
    rows = []
    for n in range(N):
        if n < prefix:
            rows.append(torch.zeros_like(vi[0]))
            continue
        r, c = divmod(n - prefix, side)
        acc = torch.zeros_like(vi[0])
        for dr in range(size):
            for dc in range(size):
                rr, cc = r + dr - size // 2, c + dc - size // 2
                if 0 <= rr < side and 0 <= cc < side:
                    w = layer.dconv.weight[head * d:(head + 1) * d, 0, dr, dc]
                    acc = acc + w * vi[prefix + rr * side + cc]
        rows.append(acc)
    return torch.stack(rows)


def linear_angular(layer, x, branch=None):
    """Spec section 2, step by step; ``branch`` = (threshold, gate) adds Castling's masked softmax."""
    o = layer.options
    q, k, v = _heads(layer, x)
    out = []
    for qb, kb, vb in zip(q, k, v):
        row = []
        for head, (qi, ki, vi) in enumerate(zip(qb, kb, vb)):
            N, d = vi.shape
            q_hat = [_unit(qi[n], o.eps) for n in range(N)]
            k_hat = [_unit(ki[m], o.eps) for m in range(N)]
            tokens = []
            for n in range(N):
                linear_term = sum((q_hat[n] @ k_hat[m]) * vi[m] for m in range(N)) / math.pi
                if o.constant == "official":
                    y = 0.5 * vi[n] + linear_term
                else:
                    row_sum = 0.5 * N + sum(q_hat[n] @ k_hat[m] for m in range(N)) / math.pi
                    y = (0.5 * vi.sum(dim=0) + linear_term) / row_sum
                if branch is not None:
                    threshold, gate = branch
                    scores = torch.stack([qi[n] @ ki[m] / math.sqrt(d) for m in range(N)])
                    probs = torch.softmax(scores, dim=0)
                    y = y + sum(gate * probs[m] * vi[m] for m in range(N) if probs[m] > threshold)
                if o.normalize_output:
                    y = _unit(y, o.eps)
                tokens.append(y)
            y = torch.stack(tokens)
            if o.residual == "dwconv":
                y = y + _dwconv_tokens(layer.dconv.weight[head, 0, :, 0], vi)
            elif o.residual == "dwconv2d":
                y = y + _dwconv_grid(layer, head, vi)
            row.append(y)
        out.append(row)
    return _merge_and_project(layer, out)


def identity(layer, x):
    _, _, v = _heads(layer, x)
    return _merge_and_project(layer, v)
