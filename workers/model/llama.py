"""A Llama-family decoder (Llama, Qwen2, Mistral) over a flat batch of tokens and a paged KV cache.

One forward call serves any mix of prefill, chunked prefill and decode: the tokens of all
sequences are concatenated, and the attention backend maps each to its sequence's blocks.
Projections are fused (q/k/v in one matmul, gate/up in another) because on a CPU the number of
matmuls, not only their size, costs time. The residual stream is carried beside the layer
output, so each residual add is fused with the RMSNorm after it; on float32 CPU tensors those
norms, the rotary embedding and SiLU-times-up run as single-pass C kernels (cpu_ops), and on
CUDA tensors as Triton kernels (triton_ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.attention.base import AttentionBackend, AttentionMetadata
from workers.model import cpu_ops, triton_ops
from workers.model.config import ModelConfig
from workers.model.linear import Linear, linear
from workers.model.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x); with no residual yet, (norm(x), x)."""
        if cpu_ops.usable(x):
            return cpu_ops.add_rms_norm(x, residual, self.weight, self.eps), (
                x if residual is None else residual  # the C kernel added x into it in place
            )
        if x.is_cuda and triton_ops.usable(x):
            return triton_ops.add_rms_norm(x, residual, self.weight, self.eps), (
                x if residual is None else residual  # so did the Triton kernel
            )
        h = x if residual is None else residual + x
        h32 = h.float()
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h32.to(h.dtype), h


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_window
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        # Llama's attention_bias also covers o_proj; Qwen2 has biases on q/k/v only.
        o_bias = config.attention_bias and config.architecture != "Qwen2ForCausalLM"
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.backend = backend

    def forward(self, x, positions, rope, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        q, k = rope(positions, q, k)
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias
        )
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if cpu_ops.usable(gate_up):
            return self.down_proj(cpu_ops.silu_mul(gate_up))
        if gate_up.is_cuda and triton_ops.usable(gate_up):
            return self.down_proj(triton_ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, positions, rope, kv_cache, meta):
        """(this layer's output, the residual stream before it is added)."""
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, rope, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """The whole model; `forward` returns float32 logits for the requested token rows only."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, backend) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = RotaryEmbedding(config)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],  # per layer [2, num_blocks, block_size, kv_heads, head_dim]
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # [N] rows of the batch whose next-token logits are wanted
    ) -> torch.Tensor:  # [N, vocab] float32
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.rope, kv_cache, meta)
        x, _ = self.norm(x[logits_indices], residual[logits_indices])
        return linear(x, self.lm_head_weight).float()
