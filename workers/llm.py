"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from dataclasses import replace

from kvstore.sampling_params import SamplingParams
from workers.engine import Engine, EngineConfig
from workers.outputs import CompletionOutput, RequestOutput


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        speculative: dict | None = None,
        seed: int = 0,
        **engine_kwargs,
    ) -> None:
        self.engine = Engine(
            EngineConfig(
                model=str(model),
                dtype=dtype,
                block_size=block_size,
                enable_prefix_caching=enable_prefix_caching,
                speculative=speculative,
                seed=seed,
                **engine_kwargs,
            )
        )
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | list[str | list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion, batched continuously; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        engine = self.engine
        # n > 1 runs n requests over one prompt; prefix caching shares its blocks among them.
        groups: list[list[str]] = []
        results: dict[str, CompletionOutput] = {}
        prompt_ids: list[list[int]] = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                group = []
                for j in range(params.n):
                    child = params if params.n == 1 else _child_params(params, j)
                    request = engine.add_request(prompt, child)
                    group.append(request.request_id)
                    results[request.request_id] = CompletionOutput(
                        j, "", [], None, [] if params.logprobs is not None else None
                    )
                groups.append(group)
                prompt_ids.append(request.prompt_token_ids)
            while engine.has_unfinished():
                for delta in engine.step():
                    out = results[delta.request_id]
                    out.text += delta.new_text
                    out.token_ids.extend(delta.new_token_ids)
                    if delta.new_logprobs and out.logprobs is not None:
                        out.logprobs.extend(delta.new_logprobs)
                    out.finish_reason = delta.finish_reason
        except BaseException:
            for rid in results:
                engine.abort_request(rid)
            raise
        return [
            RequestOutput(
                request_id=group[0],
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_token_ids=ids,
                outputs=[results[rid] for rid in group],
            )
            for prompt, ids, group in zip(prompts, prompt_ids, groups)
        ]

    def stats(self) -> dict[str, float]:
        return self.engine.stats()


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    """The j-th of n samples: its own seed (if seeded) so the n samples differ."""
    seed = None if params.seed is None else params.seed + index
    return replace(params, n=1, seed=seed)
