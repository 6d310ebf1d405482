"""One worker: a model, its paged KV cache and the engine that batches requests over it."""

from kvstore.sampling_params import SamplingParams
from workers.engine import Engine, EngineConfig
from workers.llm import LLM
from workers.outputs import CompletionOutput, RequestDelta, RequestOutput

__all__ = [
    "LLM",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "RequestDelta",
    "RequestOutput",
    "SamplingParams",
]
