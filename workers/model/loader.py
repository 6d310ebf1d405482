"""Load a Hugging Face checkpoint directory into Manta's fused-projection model.

Weights are read one tensor at a time from memory-mapped safetensors files straight into the
preallocated parameters, so the process never holds a second full copy of the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from workers.attention.base import AttentionBackend
from workers.attention.torch_ref import TorchAttentionBackend
from workers.model.config import ModelConfig
from workers.model.llama import LlamaForCausalLM
from workers.model.rope import RotaryEmbedding

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: sharded (with an index) or single."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index.name} are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in model directory {str(model_dir)!r}")
    return files


def _shard_targets(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """Checkpoint projection name -> (fused parameter, first row, end row)."""
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    return {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
        "self_attn.k_proj": ("self_attn.qkv_proj", q, q + kv),
        "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, q + 2 * kv),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, inter),
        "mlp.up_proj": ("mlp.gate_up_proj", inter, 2 * inter),
    }


def _destination(name: str, config: ModelConfig) -> tuple[str, slice | None] | None:
    """Where a checkpoint tensor goes: (parameter name, row slice or None); None = skip it."""
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    if name == "lm_head.weight":
        return None if config.tie_word_embeddings else ("lm_head.weight", None)
    if name in ("model.embed_tokens.weight", "model.norm.weight"):
        return name.removeprefix("model."), None
    match = _LAYER.match(name)
    if match is None:
        raise ValueError(f"unexpected tensor {name!r} in checkpoint")
    layer, module, kind = match.groups()
    fused = _shard_targets(config).get(module)
    if fused is not None:
        target, start, end = fused
        return f"layers.{layer}.{target}.{kind}", slice(start, end)
    return f"layers.{layer}.{module}.{kind}", None


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backend: AttentionBackend | None = None,
) -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    config = ModelConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, backend or TorchAttentionBackend())
    model = model.to_empty(device=device).to(dtype)
    model.rope = RotaryEmbedding(config).to(device)  # float32 tables; meta init left them empty

    params = dict(model.named_parameters())
    # Every parameter row range that must be filled, so a missing tensor is caught by name.
    shard_starts: dict[str, list[int]] = {}
    for target, start, _ in _shard_targets(config).values():
        shard_starts.setdefault(target, []).append(start)
    unfilled = {
        (pname, start)
        for pname in params
        for start in shard_starts.get(".".join(pname.split(".")[2:-1]), [0])
    }

    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                dest = _destination(name, config)
                if dest is None:
                    continue
                pname, rows = dest
                if pname not in params:
                    raise ValueError(f"unexpected tensor {name!r} in {path.name}")
                target = params[pname].data if rows is None else params[pname].data[rows]
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(
                        f"tensor {name!r} in {path.name} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(target.shape)}"
                    )
                target.copy_(tensor)
                unfilled.discard((pname, 0 if rows is None else rows.start))
    if unfilled:
        missing = sorted(f"{p} (rows from {r})" if r else p for p, r in unfilled)
        raise ValueError(f"checkpoint in {str(model_dir)!r} lacks weights for: {missing[:8]}")
    return model.eval()
