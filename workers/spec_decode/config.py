"""Speculative decoding settings, parsed from the `speculative={...}` dict users pass."""

from __future__ import annotations

from dataclasses import dataclass, fields

MAX_SPECULATIVE_TOKENS = 16


@dataclass(slots=True)
class SpeculativeConfig:
    method: str  # "ngram" (prompt lookup) or "draft" (a smaller model, same tokenizer)
    num_speculative_tokens: int | str = 4  # k per step, or "auto": chosen per step
    model: str | None = None  # the draft checkpoint, for method "draft"
    max_speculative_tokens: int = 8  # the most "auto" may choose
    ngram_max: int = 4
    ngram_min: int = 1
    draft_num_blocks: int | None = None  # the draft's own KV pool (default: as the target's)

    def __post_init__(self) -> None:
        if self.method not in ("ngram", "draft"):
            raise ValueError(f"speculative method must be 'ngram' or 'draft', got {self.method!r}")
        if self.method == "draft" and not self.model:
            raise ValueError("speculative method 'draft' needs 'model': the draft checkpoint")
        k = self.num_speculative_tokens
        top = MAX_SPECULATIVE_TOKENS
        if k != "auto" and not (isinstance(k, int) and 1 <= k <= top):
            raise ValueError(f"num_speculative_tokens must be 1..{top} or 'auto', got {k!r}")
        if not 1 <= self.max_speculative_tokens <= top:
            raise ValueError(f"max_speculative_tokens must be 1..{top}")

    @property
    def adaptive(self) -> bool:
        return self.num_speculative_tokens == "auto"

    @classmethod
    def from_dict(cls, raw: dict) -> SpeculativeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown speculative settings {unknown}; known: {sorted(known)}")
        if "method" not in raw:
            raise ValueError("speculative settings need 'method': 'ngram' or 'draft'")
        return cls(**raw)
