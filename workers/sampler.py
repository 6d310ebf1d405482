"""Turns one step's logits into next tokens: greedy, temperature, top-k, top-p, min-p, seeds.

Every filter keeps the tokens whose temperature-scaled logit is >= a per-row threshold, so
tied tokens are kept or dropped together and no result depends on the order of a sort.
Sampling is an exponential race: argmax(p / E) with E ~ Exponential(1) drawn per token picks
token i with probability p_i in one vectorised pass; the draw needs no cumulative sum and no
host sync. Generators must live on the logits' device (make_generator takes the device).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor

from kvstore.messages import TokenLogprobs
from kvstore.sampling_params import SamplingParams

_NEG_INF = float("-inf")
# How many of the most likely tokens to search for the top-p cut before sorting everything.
_TOP_P_CANDIDATES = (64, 1024)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private random stream for a seeded request; None for an unseeded one."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(slots=True)
class SamplingBatch:
    """The sampling settings of one step's rows as tensors, built once per step.

    Greedy rows carry neutral values (temperature 1, no filters, no generator) so the
    vectorised sampling path stays finite on them; their tokens come from the argmax.
    """

    temperatures: Tensor  # [B] float32
    top_k: Tensor  # [B] int64, vocab_size where off
    top_p: Tensor  # [B] float32, 1.0 where off
    min_p: Tensor  # [B] float64, 0.0 where off
    greedy: Tensor  # [B] bool
    generators: list[torch.Generator | None]  # per row; None where unseeded or greedy
    vocab_size: int
    all_greedy: bool
    all_random: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    max_top_k: int  # largest top_k among rows that use it; vocab_size when none does
    max_num_logprobs: int | None  # largest `logprobs` asked for; None when no row asks

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> SamplingBatch:
        """Gathers the rows' settings; `generators[i]` is row i's stream (see make_generator)."""
        if len(generators) != len(params):
            raise ValueError(f"{len(params)} params but {len(generators)} generators")
        temperatures, top_k, top_p, min_p, greedy, gens = [], [], [], [], [], []
        for p, gen in zip(params, generators):
            greedy.append(p.greedy)
            if p.greedy:
                temperatures.append(1.0)
                top_k.append(vocab_size)
                top_p.append(1.0)
                min_p.append(0.0)
                gens.append(None)
            else:
                temperatures.append(p.temperature)
                top_k.append(min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size)
                top_p.append(p.top_p)
                min_p.append(p.min_p)
                gens.append(gen)
        used_top_k = [k for k in top_k if k < vocab_size]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperatures=torch.tensor(temperatures, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            # float64: a min_p below float32's range (1e-45) would round to 0, turning it off.
            min_p=torch.tensor(min_p, dtype=torch.float64, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            generators=gens,
            vocab_size=vocab_size,
            all_greedy=all(greedy),
            all_random=not any(greedy),
            any_top_k=bool(used_top_k),
            any_top_p=any(p < 1.0 for p in top_p),
            any_min_p=any(m > 0.0 for m in min_p),
            max_top_k=max(used_top_k, default=vocab_size),
            max_num_logprobs=max(asked, default=None),
        )


def _kth_largest(logits: Tensor, top_k: Tensor, max_top_k: int) -> Tensor:
    """[B, 1] k-th largest logit of each row; -inf where top_k >= vocab (filter off)."""
    vocab_size = logits.shape[-1]
    k_max = min(max_top_k, vocab_size)
    values = logits.topk(k_max, dim=-1).values
    kth = values.gather(-1, (top_k.clamp(max=k_max) - 1).unsqueeze(-1))
    return kth.masked_fill((top_k >= vocab_size).unsqueeze(-1), _NEG_INF)


def _top_p_cut(logits: Tensor, top_p: Tensor, top_k: Tensor | None) -> Tensor:
    """[B, 1] logit of the last token of each row's nucleus; -inf where top_p >= 1.

    `logits` already has top-k applied. Searches the most likely few tokens first and widens
    only while some row's nucleus is larger, because a full sort of the vocabulary is slow.
    """
    vocab_size = logits.shape[-1]
    probs = logits.softmax(-1)
    active = (top_p < 1.0).unsqueeze(-1)
    # A nucleus never extends past its row's top-k set, whose mass may round to just below 1.
    last = vocab_size - 1 if top_k is None else (top_k - 1).unsqueeze(-1)
    for candidates in (*_TOP_P_CANDIDATES, vocab_size):
        num = min(candidates, vocab_size)
        values, ids = logits.topk(num, dim=-1)
        mass = probs.gather(-1, ids).cumsum(-1)
        cut = (mass < top_p.unsqueeze(-1)).sum(-1, keepdim=True).clamp(max=last)
        if num == vocab_size or not bool(((cut >= num) & active).any()):
            break
    threshold = values.gather(-1, cut.clamp(max=num - 1))
    return threshold.masked_fill(~active, _NEG_INF)


def apply_top_k_top_p_min_p(
    logits: Tensor,
    top_k: Tensor | None = None,
    top_p: Tensor | None = None,
    min_p: Tensor | None = None,
    max_top_k: int | None = None,
) -> Tensor:
    """Returns [B, V] logits with every token outside each row's kept set at -inf.

    In order: top-k keeps logits >= the k-th largest; top-p keeps the smallest set of most
    likely tokens (under the top-k distribution) whose mass reaches top_p, plus ties of its
    last token; min-p keeps tokens with prob >= min_p * max prob, i.e. logit >= max +
    log(min_p). None skips a filter; off rows hold top_k = V, top_p = 1, min_p = 0.
    `max_top_k` (the largest k below V) spares a host sync when the caller knows it.
    """
    vocab_size = logits.shape[-1]
    thresholds: list[Tensor] = []
    if top_k is not None:
        if max_top_k is None:
            max_top_k = int(torch.where(top_k < vocab_size, top_k, 1).max())
        kth = _kth_largest(logits, top_k, max_top_k)
        thresholds.append(kth)
    if top_p is not None:
        masked = logits if top_k is None else logits.masked_fill(logits < kth, _NEG_INF)
        thresholds.append(_top_p_cut(masked, top_p, top_k))
    if min_p is not None:
        log_min_p = min_p.log().to(logits.dtype).unsqueeze(-1)
        thresholds.append(logits.amax(-1, keepdim=True) + log_min_p)
    if not thresholds:
        return logits
    threshold = reduce(torch.maximum, thresholds)
    return logits.masked_fill(logits < threshold, _NEG_INF)


def _sampling_probs(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """[B, V] distribution of the sampling path for every row (greedy rows not special-cased)."""
    scaled = logits / batch.temperatures.unsqueeze(-1)
    filtered = apply_top_k_top_p_min_p(
        scaled,
        top_k=batch.top_k if batch.any_top_k else None,
        top_p=batch.top_p if batch.any_top_p else None,
        min_p=batch.min_p if batch.any_min_p else None,
        max_top_k=batch.max_top_k,
    )
    return filtered.softmax(-1)


def probs_from_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """[B, V] float32 distribution each row's token is drawn from; one-hot on greedy rows.

    Speculative decoding uses it for the target and draft distributions of rejection sampling.
    """
    logits = logits.float()
    if batch.all_random:
        return _sampling_probs(logits, batch)
    one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    if batch.all_greedy:
        return one_hot
    return torch.where(batch.greedy.unsqueeze(-1), one_hot, _sampling_probs(logits, batch))


def sample_from_probs(
    probs: Tensor, generators: Sequence[torch.Generator | None] | None = None
) -> Tensor:
    """[B] int64 tokens drawn from [B, V] (possibly unnormalised) probs by the exponential race.

    A row with a generator draws all its noise from that generator alone, so its token depends
    only on its own probs and generator state, never on the batch around it. Other rows use
    the global generator.
    """
    noise = torch.empty_like(probs)
    seeded = [(row, gen) for row, gen in enumerate(generators or ()) if gen is not None]
    if len(seeded) < probs.shape[0]:
        noise.exponential_()
    for row, gen in seeded:
        noise[row].exponential_(generator=gen)
    return probs.div(noise).argmax(-1)


@dataclass(slots=True)
class SamplerOutput:
    """One step's chosen tokens and, when asked, their log-probabilities.

    Log-probabilities are those of the raw model distribution (log_softmax of the logits,
    before temperature and filters), as vLLM reports by default.
    """

    token_ids: Tensor  # [B] int64
    logprobs: Tensor | None = None  # [B] float32, of the chosen tokens
    top_logprobs: tuple[Tensor, Tensor] | None = None  # ([B, k] values, [B, k] ids), descending


class Sampler:
    """Picks one token per row; stateless, so one instance serves every step."""

    def __call__(
        self, logits: Tensor, batch: SamplingBatch, num_logprobs: int | None = None
    ) -> SamplerOutput:
        """Samples from [B, V] logits; `num_logprobs` None: no log-probs, 0: the chosen
        token's only, k > 0: also the k most likely tokens' (pass batch.max_num_logprobs)."""
        logits = logits.float()
        if batch.all_greedy:
            token_ids = logits.argmax(-1)
        else:
            token_ids = sample_from_probs(_sampling_probs(logits, batch), batch.generators)
            if not batch.all_random:
                token_ids = torch.where(batch.greedy, logits.argmax(-1), token_ids)
        if num_logprobs is None:
            return SamplerOutput(token_ids)
        logprobs = logits.log_softmax(-1)
        chosen = logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        if num_logprobs == 0:
            return SamplerOutput(token_ids, chosen)
        top = logprobs.topk(num_logprobs, dim=-1)
        return SamplerOutput(token_ids, chosen, (top.values, top.indices))

    def sample(
        self,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        logits: Tensor,
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """One token per row of [B, V] logits, and the logprobs of the rows that asked."""
        if all(p.greedy and p.logprobs is None for p in params):  # no batch tensors needed
            return logits.argmax(-1).tolist(), [None] * len(params)
        batch = SamplingBatch.from_params(params, generators, logits.shape[-1], logits.device)
        sampled = self(logits, batch, batch.max_num_logprobs)
        token_ids = sampled.token_ids.tolist()
        if sampled.logprobs is None:
            return token_ids, [None] * len(params)
        chosen = sampled.logprobs.tolist()
        top_values, top_ids = (
            (t.tolist() for t in sampled.top_logprobs) if sampled.top_logprobs else (None, None)
        )
        logprobs: list[TokenLogprobs | None] = []
        for i, p in enumerate(params):
            if p.logprobs is None:
                logprobs.append(None)
                continue
            k = p.logprobs
            top = dict(zip(top_ids[i][:k], top_values[i][:k])) if k else {}
            logprobs.append(TokenLogprobs(token_ids[i], chosen[i], top))
        return token_ids, logprobs
