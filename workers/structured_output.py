"""Structured outputs: a grammar per constrained request, and the token mask it puts on logits.

Grammars come from xgrammar (what vLLM, SGLang and TensorRT-LLM use; it runs on CPU), built
from the model's vocabulary once per engine and imported only when a constrained request
arrives, so the engine's import path stays free of it. Compiled grammars are cached by the
compiler, keyed by the canonical text of the spec (JSON with sorted keys), within a byte bound.
A constrained request's matcher advances with every token appended to it; the mask is applied
to the rows of constrained requests only. Speculation skips constrained requests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from kvstore.sampling_params import STRUCTURED_KINDS
from workers.request import Request

CACHE_LIMIT_BYTES = 64 * 2**20


class StructuredOutputs:
    """The engine's grammar compiler and the masks of one step."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._compiler = None

    def matcher(self, kind: str, spec: str):
        """A fresh matcher for a request; ValueError naming the problem if the spec is bad."""
        xgr = _xgrammar()
        compiler = self._compiler or self._build_compiler(xgr)
        try:
            # Compact JSON: a weak model would otherwise fill the allowed whitespace.
            if kind == "json":
                grammar = compiler.compile_json_schema(
                    _canonical(spec), any_whitespace=False, strict_mode=True
                )
            elif kind == "json_object":
                grammar = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif kind == "regex":
                grammar = compiler.compile_regex(spec)
            elif kind == "choice":
                choices = json.loads(spec)
                grammar = compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c) for c in choices)
                )
            elif kind == "grammar":
                grammar = compiler.compile_grammar(spec)
            else:
                raise ValueError(
                    f"unknown structured output kind {kind!r}; one of {STRUCTURED_KINDS}"
                )
        except (RuntimeError, ValueError, TypeError) as error:
            raise ValueError(f"invalid {kind} for structured output: {error}") from None
        return xgr.GrammarMatcher(grammar)

    def apply_masks(self, logits: torch.Tensor, requests: Sequence[Request]) -> None:
        """Mask, in place, the tokens each constrained row's grammar does not allow next."""
        rows = [i for i, r in enumerate(requests) if r.grammar is not None]
        if not rows:
            return
        xgr = _xgrammar()
        mask = xgr.allocate_token_bitmask(len(requests), self._vocab_size)
        for row in rows:
            requests[row].grammar.fill_next_token_bitmask(mask, row)
        with torch.inference_mode():  # the model's logits are inference tensors
            xgr.apply_token_bitmask_inplace(
                logits, mask.to(logits.device), vocab_size=self._vocab_size, indices=rows
            )

    def _build_compiler(self, xgr):
        backend = self._tokenizer._backend
        size = backend.get_vocab_size(with_added_tokens=True)
        encoded = [backend.id_to_token(i) or "" for i in range(size)]
        info = xgr.TokenizerInfo(
            encoded,
            xgr.VocabType.BYTE_LEVEL,
            vocab_size=self._vocab_size,
            stop_token_ids=sorted(self._tokenizer.eos_token_ids),
        )
        self._compiler = xgr.GrammarCompiler(
            info, max_threads=1, cache_enabled=True, cache_limit_bytes=CACHE_LIMIT_BYTES
        )
        return self._compiler


def advance(request: Request, token_ids: Sequence[int]) -> bool:
    """Feed the request's grammar the tokens just appended; True once the grammar is done."""
    matcher = request.grammar
    for token in token_ids:
        if matcher.is_terminated() or not matcher.accept_token(token):
            return True
    return matcher.is_terminated()


def _canonical(spec: str) -> str:
    """One text per schema (sorted keys, no spaces): the compiler's cache key."""
    try:
        return json.dumps(json.loads(spec), sort_keys=True, separators=(",", ":"))
    except json.JSONDecodeError as error:
        raise ValueError(f"the JSON schema is not JSON: {error}") from None


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError(
            "structured outputs need xgrammar on the workers: pip install xgrammar"
        ) from None
    return xgrammar
