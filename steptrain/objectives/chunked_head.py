"""Token log-probs of a large-vocabulary LM head without ``[N, V]`` logits for all N tokens at once.

A causal LM's head is ``logits = hidden @ W.T (+ b)``; the training objectives only need, per labelled
position, ``log p(y) = logits[y] - logsumexp(logits)`` (and the argmax for accuracy). :class:`HeadInput`
carries the final hidden states ``[B, T, H]`` and the head's weight ``[V, H]`` instead of the logits;
:func:`head_token_logps` computes the log-probs of the labelled positions ``n`` rows at a time with a
custom autograd function whose backward recomputes each chunk's logits, so the peak is one chunk's
``[n, V]`` (float32) instead of ``[N, V]``:

    d log p_i / d logits_ij = 1[j = y_i] - softmax(logits_i)_j
    d hidden_i = sum_j d logits_ij W_j,   d W = sum_i d logits_i^T hidden_i

Positions whose target is -100 are dropped before the head (no compute, exactly zero gradient), as the
plain path's ``ignore_index`` gives. The matmul runs in the dtype the plain head would have used (the
autocast dtype when the forward ran under autocast), the softmax in float32 (float64 for a float64
model), so the result equals the plain ``F.cross_entropy(logits.float())`` to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class HeadInput:
    """What the LM head would have turned into logits: ``hidden [B, T, H]`` and ``weight [V, H]`` (``bias [V]``).

    Indexing slices the positions (``head[:, :-1]``), as one would slice the logits; ``shape`` is the shape
    the logits would have, ``[B, T, V]``.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    chunk_tokens: int = 4096
    compute_dtype: torch.dtype | None = None  # the head matmul's dtype (None: the hidden/weight promotion)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def __getitem__(self, index) -> HeadInput:
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > self.hidden.dim() - 1 or any(i is Ellipsis for i in index):
            raise IndexError("a HeadInput is indexed over its positions only (e.g. head[:, :-1])")
        return self.with_hidden(self.hidden[index])

    def with_hidden(self, hidden: torch.Tensor) -> HeadInput:
        return HeadInput(hidden, self.weight, self.bias, self.chunk_tokens, self.compute_dtype)

    def gather(self, positions: torch.Tensor) -> HeadInput:
        """The hidden states at ``positions [B, J]`` (per row), as ``torch.gather`` on the logits' dim 1."""
        h = self.hidden
        return self.with_hidden(torch.gather(h, 1, positions[..., None].expand(-1, -1, h.shape[-1])))

    def logits(self) -> torch.Tensor:
        """The full logits (the plain path; for tests and small batches)."""
        dtype = self._dtype()
        return F.linear(self.hidden.to(dtype), self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))

    def _dtype(self) -> torch.dtype:
        return self.compute_dtype or torch.promote_types(self.hidden.dtype, self.weight.dtype)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _ChunkedTargetLogp(torch.autograd.Function):
    """(log p(targets) [n], argmax == targets [n]) of ``hidden [n, H]`` rows under the head, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, dtype: torch.dtype):
        acc = _accumulate_dtype(dtype)
        n = hidden.shape[0]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        hit = torch.empty(n, dtype=torch.bool, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = F.linear(hidden[s:e].to(dtype), w, b).to(acc)
            picked = logits.gather(1, targets[s:e, None]).squeeze(1)
            top, arg = logits.max(-1)
            hit[s:e] = arg == targets[s:e]
            # logsumexp in the logits' own buffer (no second [n, V] temporary): top + log sum exp(x - top)
            lse[s:e] = top + logits.sub_(top[:, None]).exp_().sum(-1).log_()
            logp[s:e] = picked - lse[s:e]
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        ctx.mark_non_differentiable(hit)
        return logp, hit

    @staticmethod
    def backward(ctx, grad_logp, _grad_hit):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        acc = _accumulate_dtype(dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        grad_logp = grad_logp.to(acc)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = hidden[s:e].to(dtype)
            g = grad_logp[s:e, None]
            # d logits = g * (onehot(y) - softmax), built in place in the recomputed logits' buffer
            d = F.linear(h, w, b).to(acc).sub_(lse[s:e, None]).exp_().mul_(-g)
            d.scatter_add_(1, targets[s:e, None], g)
            if need_b:
                grad_b += d.sum(0)
            d = d.to(dtype)
            if need_h:
                grad_h[s:e] = (d @ w).to(hidden.dtype)
            if need_w:  # accumulate in place: no second [V, H] temporary per chunk
                if dtype == acc:
                    grad_w.addmm_(d.t(), h)
                else:
                    grad_w += (d.t() @ h).to(acc)
            del d
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def head_token_logps(head: HeadInput, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(targets) , argmax == targets) per position, shaped like ``targets``; both 0 / False where the
    target is -100. ``head.hidden`` is ``[*targets.shape, H]``."""
    if head.hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match the head's positions {tuple(head.hidden.shape[:-1])}")
    if head.chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {head.chunk_tokens}")
    dtype = head._dtype()
    flat_t = targets.reshape(-1)
    idx = (flat_t != IGNORE_INDEX).nonzero().squeeze(1)
    hidden = head.hidden.reshape(-1, head.hidden.shape[-1]).index_select(0, idx)
    logp, hit = _ChunkedTargetLogp.apply(hidden, head.weight, head.bias, flat_t[idx], head.chunk_tokens, dtype)
    acc = _accumulate_dtype(dtype)
    full = torch.zeros(flat_t.shape[0], dtype=acc, device=logp.device).index_copy(0, idx, logp)
    hits = torch.zeros(flat_t.shape[0], dtype=torch.bool, device=hit.device).index_copy(0, idx, hit)
    return full.view(targets.shape), hits.view(targets.shape)
