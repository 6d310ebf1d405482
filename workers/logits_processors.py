"""What users set to steer the next token, applied to a step's logits before sampling.

In vLLM's order: first `logit_bias` (OpenAI: added to the token's logit) and `min_tokens`
(vLLM: the request's stop tokens, EOS included, cannot be chosen before that many tokens),
then the penalties over the tokens so far. `repetition_penalty` (vLLM and transformers) divides
a positive logit, and multiplies a negative one, of every token in the prompt or the output;
`frequency_penalty` and `presence_penalty` (OpenAI) subtract, per token of the output, its count
times the one and, once it has appeared, the other. Only rows whose request sets one of these
are touched, so a batch that sets none costs one check per request.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kvstore.sampling_params import SamplingParams
from workers.request import Request


def steers_logits(params: SamplingParams) -> bool:
    """Whether the request sets anything this module applies."""
    return bool(
        params.logit_bias
        or params.min_tokens
        or params.presence_penalty
        or params.frequency_penalty
        or params.repetition_penalty != 1.0
    )


def apply_logits_processors(logits: Tensor, requests: Sequence[Request]) -> Tensor:
    """`logits` [B, V] with row i steered as `requests[i]` asks (in place where any does)."""
    steered = [row for row, request in enumerate(requests) if steers_logits(request.params)]
    if steered:
        with torch.inference_mode():  # the model's logits are inference tensors
            for row in steered:
                _steer(logits[row], requests[row])
    return logits


def _steer(logits: Tensor, request: Request) -> None:
    params, device = request.params, logits.device
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=device)
        logits.index_add_(0, ids, torch.tensor(list(params.logit_bias.values()), device=device))
    if request.num_output_tokens < params.min_tokens and request.stop_token_ids:
        logits[torch.tensor(sorted(request.stop_token_ids), device=device)] = float("-inf")
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.token_ids)), device=device)
        values = logits[seen]
        penalty = params.repetition_penalty
        logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
    output = request.generated_token_ids
    if output and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(output, device=device), minlength=logits.numel())
        counts = counts[: logits.numel()].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
