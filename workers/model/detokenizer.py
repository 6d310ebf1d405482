"""Streaming detokenization: turns generated token ids into text deltas as they arrive.

Byte-level BPE splits a multi-byte character (emoji, CJK) across tokens, so decoding each
token alone would emit U+FFFD fragments. Each step decodes a short window of recent tokens
and emits only the text past what was already emitted, holding back a trailing incomplete
character until a later token completes it (the prefix/read offset method, as in vLLM).
`tokenizers.decoders.DecodeStream` does the same but cannot release held bytes that never
complete, so on arbitrary token sequences (random models) its output can fall short of
`decode`.
"""

import os

import tokenizers

# Prompt tokens decoded ahead of the generated ones, so the first generated tokens are
# rendered in context (a completed split character, a leading space kept).
PROMPT_CONTEXT_TOKENS = 6
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas for one sequence of generated tokens, one `push` per token.

    Without prompt ids the concatenated deltas, followed by `flush()`, equal
    `decode(generated_ids)`. With prompt ids the first tokens are decoded in the prompt's
    context; for byte-level tokenizers this is the same text whenever the prompt ends on a
    character boundary.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        unemitted: int = 0,
    ) -> None:
        self._backend = backend
        self._skip_special = skip_special_tokens
        context = max(PROMPT_CONTEXT_TOKENS, unemitted)
        self._ids = list(prompt_ids[-context:]) if prompt_ids else []
        self._prefix_offset = 0  # window start: tokens before it are never decoded again
        # Tokens before it have been emitted; the prompt's last `unemitted` have not (a
        # resumed stream's unfinished character), so their text comes out with the next.
        self._read_offset = max(0, len(self._ids) - unemitted)
        self._prefix_text = self._decode(0, self._read_offset)
        self._text = ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._backend.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Adds one generated token and returns the new text (possibly empty)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Returns the text still held back (an incomplete character at the end of the
        sequence, decoded as U+FFFD exactly as `decode` would); call once when done."""
        return self._advance(final=True)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        full = self._decode(self._prefix_offset)
        if not final and (len(full) <= len(self._prefix_text) or full.endswith(REPLACEMENT_CHAR)):
            return ""
        if full.startswith(self._prefix_text):
            delta = full[len(self._prefix_text) :]
        else:  # the window began with a split character that this token completed
            delta = full[len(os.path.commonprefix([self._prefix_text, full])) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._text += delta
        return delta
