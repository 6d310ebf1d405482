"""Verifies one step's draft tokens against the target model, for a batch of requests.

Request i brings k_i draft tokens and k_i + 1 consecutive target rows: row j predicts the token
after the j-th verified position, so row k_i predicts the bonus token. Greedy verification keeps
the drafts that equal the target argmax; sampled verification is the rejection rule of
Leviathan et al. / Chen et al., which leaves the emitted tokens distributed exactly as the
target's. Each request emits between 1 and k_i + 1 tokens. Both run as a few batched tensor
ops and one host sync (two when sampling); per-request Python work is list slicing plus, for
proposers with draft distributions, a small gather and row subtraction per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from workers.sampler import sample_from_probs


@dataclass(slots=True)
class _Layout:
    """Where each request's drafts and target rows sit in the flat batch."""

    counts: list[int]  # [R] k_i
    draft_start: list[int]  # [R] first flat draft index of request i
    row_start: Tensor  # [R] int64, first target row of request i
    draft_req: Tensor  # [D] int64, request of each draft
    draft_pos: Tensor  # [D] int64, position j of each draft within its request
    draft_tokens: Tensor  # [D] int64


def _layout(draft_tokens: Sequence[Sequence[int]], num_rows: int, device: torch.device) -> _Layout:
    """Index tensors for the flat layout; checks the row count matches sum(k_i + 1)."""
    counts = [len(d) for d in draft_tokens]
    if num_rows != sum(counts) + len(counts):
        raise ValueError(f"{num_rows} target rows for {len(counts)} requests with {counts} drafts")
    draft_start = [0, *accumulate(counts[:-1])]
    row_start = [start + i for i, start in enumerate(draft_start)]
    num_drafts = torch.tensor(counts, dtype=torch.int64, device=device)
    draft_req = torch.repeat_interleave(torch.arange(len(counts), device=device), num_drafts)
    starts = torch.tensor(draft_start, dtype=torch.int64, device=device)
    flat = [t for d in draft_tokens for t in d]
    return _Layout(
        counts=counts,
        draft_start=draft_start,
        row_start=torch.tensor(row_start, dtype=torch.int64, device=device),
        draft_req=draft_req,
        draft_pos=torch.arange(len(flat), device=device) - starts[draft_req],
        draft_tokens=torch.tensor(flat, dtype=torch.int64, device=device),
    )


def _num_accepted(accepted: Tensor, layout: _Layout) -> Tensor:
    """[R] length of each request's leading run of accepted drafts."""
    shape = (len(layout.counts), max(layout.counts))
    padded = torch.zeros(shape, dtype=torch.int64, device=accepted.device)
    padded[layout.draft_req, layout.draft_pos] = accepted.long()
    return padded.cumprod(1).sum(1)


def _emitted(
    draft_tokens: Sequence[Sequence[int]], num_accepted: list[int], last: list[int]
) -> list[list[int]]:
    """Each request's accepted drafts followed by its last (corrected or bonus) token."""
    return [list(d[:n]) + [t] for d, n, t in zip(draft_tokens, num_accepted, last)]


def verify_greedy(target_logits: Tensor, draft_tokens: list[list[int]]) -> list[list[int]]:
    """Per request: the drafts up to the first that differs from the target argmax, then the
    target argmax at that position (the bonus row's if every draft matched)."""
    if not draft_tokens:
        return []
    layout = _layout(draft_tokens, target_logits.shape[0], target_logits.device)
    target_ids = target_logits.argmax(-1)
    draft_rows = layout.row_start[layout.draft_req] + layout.draft_pos
    num_accepted = _num_accepted(target_ids[draft_rows] == layout.draft_tokens, layout)
    last = target_ids[layout.row_start + num_accepted]
    counts, tokens = torch.stack((num_accepted, last)).tolist()
    return _emitted(draft_tokens, counts, tokens)


def _uniforms(
    layout: _Layout, generators: Sequence[torch.Generator | None], device: torch.device
) -> Tensor:
    """[D] U[0, 1) draws; a seeded request's come from its own generator alone."""
    uniforms = torch.empty(layout.draft_tokens.shape[0], device=device)
    seeded = [i for i, gen in enumerate(generators) if gen is not None and layout.counts[i]]
    if len(seeded) < len(generators):
        uniforms.uniform_()
    for i in seeded:
        start = layout.draft_start[i]
        uniforms[start : start + layout.counts[i]].uniform_(generator=generators[i])
    return uniforms


def _draft_q(layout: _Layout, draft_probs: Sequence[Tensor | None], like: Tensor) -> Tensor:
    """[D] q_j(x) of each draft x; 1 for a deterministic proposer (q one-hot on x)."""
    draft_q = torch.ones_like(like)
    for i, q in enumerate(draft_probs):
        if q is not None and layout.counts[i]:
            start, stop = layout.draft_start[i], layout.draft_start[i] + layout.counts[i]
            tokens = layout.draft_tokens[start:stop].unsqueeze(-1)
            draft_q[start:stop] = q.float().gather(-1, tokens).squeeze(-1)
    return draft_q


def _final_probs(
    final_p: Tensor,
    draft_tokens: Sequence[Sequence[int]],
    draft_probs: Sequence[Tensor | None],
    num_accepted: list[int],
) -> Tensor:
    """[R, V] rows to draw each request's last token from: max(0, p - q) at its rejected
    position, p itself after it accepted every draft (the bonus)."""
    residual = final_p.clone()
    one_hot_rows, one_hot_tokens = [], []
    for i, (drafts, q, n) in enumerate(zip(draft_tokens, draft_probs, num_accepted)):
        if n == len(drafts):
            continue
        if q is None:
            one_hot_rows.append(i)
            one_hot_tokens.append(drafts[n])
        else:
            residual[i] -= q[n].float()
    if one_hot_rows:
        residual[one_hot_rows, one_hot_tokens] -= 1.0
    residual.clamp_(min=0.0)
    # max(0, p - q) vanishes only where q covers p everywhere; p is then the right fallback.
    return torch.where(residual.sum(-1, keepdim=True) > 0, residual, final_p)


def verify_sampled(
    target_probs: Tensor,
    draft_tokens: list[list[int]],
    draft_probs: list[Tensor | None],
    generators: list[torch.Generator | None],
) -> list[list[int]]:
    """Rejection sampling: accept draft x at position j with probability min(1, p_j(x) / q_j(x));
    at the first rejection emit a sample of normalize(max(0, p_j - q_j)) and stop; if all are
    accepted emit a bonus sample of p_k.

    `target_probs` is [sum(k_i + 1), V], already temperature/top-k/top-p processed.
    `draft_probs[i]` is request i's [k_i, V] draft distributions, or None for a deterministic
    proposer (q one-hot on the draft). A seeded request draws its k_i uniforms and then its
    final sample from `generators[i]`, so its tokens do not depend on the batch around it.
    """
    if not len(draft_tokens) == len(draft_probs) == len(generators):
        raise ValueError(
            f"{len(draft_tokens)} requests, {len(draft_probs)} draft probs, "
            f"{len(generators)} generators"
        )
    if not draft_tokens:
        return []
    probs = target_probs.float()
    layout = _layout(draft_tokens, probs.shape[0], probs.device)
    draft_rows = layout.row_start[layout.draft_req] + layout.draft_pos
    target_p = probs[draft_rows, layout.draft_tokens]
    draft_q = _draft_q(layout, draft_probs, target_p)
    # u < p / q without dividing: q(x) = 0 accepts any p(x) > 0, and p(x) = 0 never accepts.
    accepted = _uniforms(layout, generators, probs.device) * draft_q < target_p
    num_accepted = _num_accepted(accepted, layout)
    counts = num_accepted.tolist()
    final = _final_probs(probs[layout.row_start + num_accepted], draft_tokens, draft_probs, counts)
    last = sample_from_probs(final, generators).tolist()
    return _emitted(draft_tokens, counts, last)
