"""Per-request sampling settings, validated once where the request arrives (the router or the
offline API) and carried typed across the router/worker boundary."""

from __future__ import annotations

from dataclasses import dataclass

# What a structured output constrains the text to (workers/structured_output.py).
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_STRUCTURED_SPEC_CHARS = 64 * 1024  # a schema, regex or grammar: bounded compile work
# Temperatures below this are treated as greedy decoding (argmax), as vLLM does.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20


def _reject(field: str, value: object, rule: str) -> None:
    raise ValueError(f"{field} {rule}, got {value!r}")


@dataclass(slots=True)
class SamplingParams:
    """How to choose the tokens of one request; names and defaults follow vLLM's.

    `top_k` of -1 (or 0, stored as -1) turns top-k off; `logprobs` is the number of top
    log-probabilities returned besides the chosen token's (0: only the chosen one, None: none).
    `stop` is always a list after construction.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Steering the next token (workers/logits_processors.py): OpenAI's penalties in [-2, 2]
    # and logit_bias (token id -> added logit, in [-100, 100]); vLLM's repetition_penalty
    # (> 0, 1 is off) and min_tokens (no stop token or EOS before that many tokens).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    # (kind, spec): the text must match a JSON schema ("json", spec: the schema's JSON), be
    # any JSON object ("json_object"), match a regex, be one of a JSON list of choices, or
    # follow an EBNF grammar.
    structured_output: tuple[str, str] | None = None
    # Mixed into the first block's hash (kvstore.hashing.salted_root): requests share cached
    # prefixes only under the same salt. The router sets it from the tenant and `cache_salt`.
    cache_salt: str | None = None
    # A resumed stream's trailing prompt tokens (tokens it had already sent) whose text the
    # client has not seen yet: an unfinished character. Their text comes with the next tokens'.
    resume_unemitted_tokens: int = 0
    # How many of a resumed stream's trailing prompt tokens are output it generated before:
    # its grammar and its penalties count them as output.
    resumed_output_tokens: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            _reject("n", self.n, "must be >= 1")
        if self.max_tokens < 1:
            _reject("max_tokens", self.max_tokens, "must be >= 1")
        if not self.temperature >= 0.0:
            _reject("temperature", self.temperature, "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            _reject("top_p", self.top_p, "must be in (0, 1]")
        if self.top_k == 0:
            self.top_k = -1
        if self.top_k < -1:
            _reject("top_k", self.top_k, "must be -1 (off) or >= 1")
        if not 0.0 <= self.min_p <= 1.0:
            _reject("min_p", self.min_p, "must be in [0, 1]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            _reject("logprobs", self.logprobs, f"must be in [0, {MAX_LOGPROBS}]")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        for stop_str in self.stop:
            if not isinstance(stop_str, str) or not stop_str:
                _reject("stop", self.stop, "must hold non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                _reject(name, getattr(self, name), "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            _reject("repetition_penalty", self.repetition_penalty, "must be in (0, 2]")
        if self.logit_bias:
            self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}
            if any(
                token < 0 or not -100.0 <= bias <= 100.0 for token, bias in self.logit_bias.items()
            ):
                _reject("logit_bias", self.logit_bias, "must map token ids >= 0 to [-100, 100]")
        if not 0 <= self.min_tokens <= self.max_tokens:
            _reject("min_tokens", self.min_tokens, f"must be in [0, max_tokens={self.max_tokens}]")
        if self.structured_output is not None:
            kind, spec = self.structured_output
            if kind not in STRUCTURED_KINDS:
                _reject("structured_output", kind, f"must be one of {STRUCTURED_KINDS}")
            if not isinstance(spec, str) or len(spec) > MAX_STRUCTURED_SPEC_CHARS:
                _reject(
                    "structured_output",
                    kind,
                    f"needs a spec of <= {MAX_STRUCTURED_SPEC_CHARS} characters",
                )
        if self.resumed_output_tokens < 0:
            _reject("resumed_output_tokens", self.resumed_output_tokens, "must be >= 0")
        if self.resume_unemitted_tokens < 0:
            _reject("resume_unemitted_tokens", self.resume_unemitted_tokens, "must be >= 0")
        if self.stop_token_ids is not None:
            self.stop_token_ids = list(self.stop_token_ids)
            if any(token_id < 0 for token_id in self.stop_token_ids):
                _reject("stop_token_ids", self.stop_token_ids, "must be >= 0")

    @property
    def greedy(self) -> bool:
        """Whether the request decodes by argmax (temperature effectively zero)."""
        return self.temperature < GREEDY_TEMPERATURE
