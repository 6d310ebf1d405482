"""Moving whole KV blocks between this worker's cache and portable payloads.

Export: prompts are counted per block; once a block has appeared in `share_after` prompts it
is hot, and as soon as its KV is computed and cached it is copied out for the shared block
store, sealed with the cluster's secret (kvstore/kv_payload.py). Import: payloads fetched for
a prompt are loaded only if their MAC verifies over this prompt's block hash and token ids and
their dtype, shape and length match this cache; they are written into free blocks that are
registered in the prefix cache, so the request's admission then finds them like any cached
prefix. `LoadCostModel` decides whether loading beats
recomputing, from measured fetch speed and measured prefill speed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from kvstore.kv_payload import BlockPayload
from workers.kv_cache import KVCacheManager


class KVTransfer:
    def __init__(
        self,
        kv: KVCacheManager,
        kv_caches: list[torch.Tensor],
        secret: bytes,
        share_after: int = 2,
        max_tracked_blocks: int = 8192,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the KV-store secret must have at least 16 bytes")
        self.secret = secret
        self.kv = kv
        self.kv_caches = kv_caches
        self.share_after = share_after
        self.max_tracked = max_tracked_blocks
        layer = kv_caches[0]  # [2, num_blocks, block_size, kv_heads, head_dim]
        self.shape = (len(kv_caches), 2, *layer.shape[2:])
        self.dtype = str(layer.dtype).removeprefix("torch.")
        self._seen: OrderedDict[int, int] = OrderedDict()  # block hash -> prompts seen in
        self._pending: dict[int, tuple[int, ...]] = {}  # hot, not exported yet
        self._exported: OrderedDict[int, None] = OrderedDict()
        self.counters = {"kv_exported_blocks": 0, "kv_imported_blocks": 0, "kv_import_rejected": 0}

    def num_cached_leading(self, token_ids: Sequence[int], hashes: Sequence[int]) -> int:
        """Leading full blocks of the prompt already in this worker's prefix cache."""
        size = self.kv.block_size
        for i, block_hash in enumerate(hashes):
            if self.kv.pool.lookup(block_hash, token_ids[i * size : (i + 1) * size]) is None:
                return i
        return len(hashes)

    # -- export -----------------------------------------------------------------------------
    def observe_prompt(self, token_ids: Sequence[int], hashes: Sequence[int]) -> None:
        """Count the prompt's blocks; a block seen in `share_after` prompts becomes hot."""
        size = self.kv.block_size
        for i, block_hash in enumerate(hashes):
            count = self._seen.pop(block_hash, 0) + 1
            self._seen[block_hash] = count
            if count >= self.share_after and block_hash not in self._exported:
                self._pending[block_hash] = tuple(token_ids[i * size : (i + 1) * size])
        while len(self._seen) > self.max_tracked:
            self._seen.popitem(last=False)

    def collect_exports(self) -> list[BlockPayload]:
        """Payloads of hot blocks whose KV is now computed and cached."""
        out = []
        for block_hash, tokens in list(self._pending.items()):
            block = self.kv.pool.lookup(block_hash, tokens)
            if block is None:
                continue  # not computed yet (or evicted): try again later
            data = torch.stack([layer[:, block.block_id] for layer in self.kv_caches])
            raw = data.contiguous().cpu().view(torch.uint8).numpy().tobytes()
            payload = BlockPayload.seal(
                self.secret, block_hash, tokens, self.dtype, self.shape, raw
            )
            out.append(payload)
            del self._pending[block_hash]
            self._exported[block_hash] = None
            if len(self._exported) > self.max_tracked:
                self._exported.popitem(last=False)
        self.counters["kv_exported_blocks"] += len(out)
        return out

    # -- import -----------------------------------------------------------------------------
    def import_prefix(
        self,
        token_ids: Sequence[int],
        hashes: Sequence[int],
        payloads: Sequence[BlockPayload],
    ) -> int:
        """Write verified payloads of the prompt's leading blocks (`hashes`: their chained
        hashes) into the prefix cache."""
        pool, size = self.kv.pool, self.kv.block_size
        by_hash = {p.block_hash: p for p in payloads}
        imported = 0
        for i, block_hash in enumerate(hashes):
            tokens = tuple(token_ids[i * size : (i + 1) * size])
            if pool.lookup(block_hash, tokens) is not None:
                continue
            payload = by_hash.get(block_hash)
            if payload is None:
                break  # the chain is broken: later blocks would never be matched
            if not self._valid(payload, block_hash, tokens) or pool.num_free_blocks == 0:
                self.counters["kv_import_rejected"] += 1
                break
            (block,) = pool.allocate(1)
            data = torch.frombuffer(bytearray(payload.data), dtype=torch.uint8)
            data = data.view(self.kv_caches[0].dtype).view(self.shape)
            for layer, values in zip(self.kv_caches, data):
                layer[:, block.block_id].copy_(values)
            pool.cache_block(block, block_hash, tokens)
            pool.free([block])  # stays cached (findable) until the pool needs the block
            imported += 1
        self.counters["kv_imported_blocks"] += imported
        return imported

    def _valid(self, payload: BlockPayload, block_hash: int, tokens: tuple[int, ...]) -> bool:
        expected_bytes = self.kv_caches[0].element_size()
        for dim in self.shape:
            expected_bytes *= dim
        return (
            payload.dtype == self.dtype
            and payload.shape == self.shape
            and len(payload.data) == expected_bytes
            and payload.verify(self.secret, block_hash, tokens)
        )


class LoadCostModel:
    """Load shared blocks only when fetching them is expected to beat recomputing them.

    Fetch time = bytes x the seconds per byte measured on past fetches (round trip included,
    so small fetches are judged conservatively); recompute time = tokens x the prefill seconds
    per token the batching policy measures. Until a fetch has been measured, loading is tried,
    so the model can learn.
    """

    def __init__(self, decay: float = 0.8) -> None:
        self.decay = decay
        self.seconds_per_byte: float | None = None

    def should_load(self, num_bytes: int, num_tokens: int, seconds_per_token: float) -> bool:
        if self.seconds_per_byte is None:
            return True
        return num_bytes * self.seconds_per_byte < num_tokens * seconds_per_token

    def observe(self, num_bytes: int, seconds: float) -> None:
        """A fetch that brought `num_bytes` took `seconds` (fetches that found nothing teach
        nothing about bandwidth and are not passed here)."""
        rate = seconds / num_bytes
        prev = self.seconds_per_byte
        d = self.decay
        self.seconds_per_byte = rate if prev is None else d * prev + (1 - d) * rate
