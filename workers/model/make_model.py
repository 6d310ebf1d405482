"""Random-weight checkpoints in the Hugging Face layout, with a real locally trained tokenizer.

The weights come straight from torch and safetensors (no transformers needed), so tests,
benchmarks and the `manta make-model` command can build models on any machine, offline.
"""

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, processors, trainers
from tokenizers import pre_tokenizers as pre

from workers.model.corpus import iter_corpus

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048,
    ),
    "small": dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096,
    ),
    # Llama-shaped, head_dim 64 (vLLM-CPU's attention needs >= 32): the peer comparison model.
    "compare": dict(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=8192, max_position_embeddings=4096,
    ),
    "bench": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, vocab_size=8192, max_position_embeddings=4096,
    ),
}  # fmt: skip

# arch (= model_type) -> (class name, default rope_theta, rms_norm_eps, q/k/v biases)
ARCHS: dict[str, tuple[str, float, float, bool]] = {
    "llama": ("LlamaForCausalLM", 500000.0, 1e-5, False),
    "qwen2": ("Qwen2ForCausalLM", 1000000.0, 1e-6, True),
    "mistral": ("MistralForCausalLM", 1000000.0, 1e-5, False),
}

BOS, EOT, IM_START, IM_END, PAD = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>",
)  # fmt: skip
SPECIAL_TOKENS = (BOS, EOT, IM_START, IM_END, PAD)

# The split pattern of Qwen2 (transformers' Qwen2Tokenizer rebuilds exactly this pre-tokenizer,
# so the same tokenizer.json behaves identically whatever the architecture).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, with tools as Qwen2.5 writes them: listed in the system turn, called in
# <tool_call> tags, answered in <tool_response> tags of a user turn.
CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if tools %}\n"
    "{{- '<|im_start|>system\\n' }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "{{- messages[0]['content'] + '\\n\\n' }}\n"
    "{%- endif %}\n"
    "{{- '# Tools\\n\\nYou may call one or more functions. Their signatures are within "
    "<tools></tools>:\\n<tools>' }}\n"
    "{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}\n"
    "{{- '\\n</tools>\\n\\nFor each call, return a JSON object with the function name and "
    'arguments within <tool_call></tool_call> tags:\\n<tool_call>\\n{"name": '
    '<function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}\n'
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{%- if message['content'] is string %}\n"
    "{%- set content = message['content'] %}\n"
    "{%- elif message['content'] is defined %}\n"
    "{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}\n"
    "{%- else %}\n"
    "{%- set content = '' %}\n"
    "{%- endif %}\n"
    "{%- if tools and loop.first and message['role'] == 'system' %}\n"
    "{%- elif message['role'] == 'tool' %}\n"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + content }}\n"
    "{{- '\\n</tool_response><|im_end|>\\n' }}\n"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined %}\n"
    "{{- '<|im_start|>assistant\\n' + content }}\n"
    "{%- for call in message['tool_calls'] %}\n"
    "{%- set call = call['function'] if call['function'] is defined else call %}\n"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}\n"
    "{{- (call['arguments'] if call['arguments'] is string else call['arguments'] | tojson)"
    " + '}\\n</tool_call>' }}\n"
    "{%- endfor %}\n"
    "{{- '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE of exactly `vocab_size` tokens, special tokens last (Llama 3 style).

    The corpus depends on the size only, so two checkpoints with the same vocab size share
    the same tokenizer (a draft model and its target, for example). Sizes up to about 16k work.
    """
    num_trained = vocab_size - len(SPECIAL_TOKENS)
    if num_trained < 512:
        minimum = 512 + len(SPECIAL_TOKENS)
        raise ValueError(f"vocab_size must be at least {minimum}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_trained,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre.ByteLevel.alphabet(),
    )
    # Enough text for every merge to be seen at least twice, and no more (training time).
    num_lines = max(5000, 3 * vocab_size)
    tok.train_from_iterator(iter_corpus(num_lines), trainer, length=num_lines)
    if tok.get_vocab_size() != num_trained:
        raise ValueError(f"the corpus only supports {tok.get_vocab_size()} BPE tokens")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tok


def special_token_id(token: str, vocab_size: int) -> int:
    """Id of one of SPECIAL_TOKENS: they take the last ids of the vocabulary, in order."""
    return vocab_size - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index(token)


def _rope_fields(theta: float, overrides: dict[str, Any], layout: str) -> dict[str, Any]:
    """Rope settings spelled for the layout, from rope_theta, rope_scaling or rope_parameters."""
    params = dict(overrides.pop("rope_parameters", None) or {})
    theta = float(overrides.pop("rope_theta", params.pop("rope_theta", theta)))
    scaling = dict(overrides.pop("rope_scaling", None) or params)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if layout == "v4":
        return {
            "rope_theta": theta,
            "rope_scaling": None if rope_type == "default" else {"rope_type": rope_type, **scaling},
        }
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **scaling}}


def make_config(preset: str, arch: str, layout: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The config.json contents for a preset and architecture, with `overrides` applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    if layout not in ("v4", "v5"):
        raise ValueError(f"unknown layout {layout!r}; expected 'v4' or 'v5'")
    cls_name, theta, eps, _ = ARCHS[arch]
    overrides = dict(overrides)
    shape = {**PRESETS[preset], **{k: overrides.pop(k) for k in PRESETS[preset] if k in overrides}}
    head_dim = overrides.pop("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    vocab = shape["vocab_size"]
    config: dict[str, Any] = {
        "architectures": [cls_name],
        "model_type": arch,
        **shape,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": special_token_id(BOS, vocab),
        "eos_token_id": [special_token_id(EOT, vocab), special_token_id(IM_END, vocab)],
        "pad_token_id": special_token_id(PAD, vocab),
        ("torch_dtype" if layout == "v4" else "dtype"): "float32",
        **_rope_fields(theta, overrides, layout),
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(sliding_window=None)
    if arch == "qwen2":
        config.update(use_sliding_window=False, max_window_layers=shape["num_hidden_layers"])
    config.update(overrides)
    if shape["num_attention_heads"] % shape["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    return config


def weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint, exactly as the transformers class names them."""
    h, v, i = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    # Only Llama reads attention_bias (o_proj too) and mlp_bias; Qwen2 always has q/k/v biases.
    llama = config["model_type"] == "llama"
    llama_attention_bias = llama and config.get("attention_bias", False)
    qkv_bias = ARCHS[config["model_type"]][3]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        if qkv_bias or llama_attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,)}
            shapes |= {p + "self_attn.v_proj.bias": (kv,)}
        if llama_attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if llama and config.get("mlp_bias"):
            shapes |= {p + f"mlp.{n}_proj.bias": (i,) for n in ("gate", "up")}
            shapes[p + "mlp.down_proj.bias"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def count_parameters(config: dict[str, Any]) -> int:
    """Parameter count derived from the config alone (tied embeddings counted once)."""
    return sum(math.prod(shape) for shape in weight_shapes(config).values())


def _tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """One tensor, seeded from (seed, name) so it does not depend on order, shards or layout."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    meta = {"format": "pt"}
    if not 1 <= num_shards <= len(tensors):
        raise ValueError(f"num_shards must be between 1 and {len(tensors)}, got {num_shards}")
    if num_shards == 1:
        save_file(tensors, out / "model.safetensors", metadata=meta)
        return
    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    shard, done = 0, 0
    for idx, name in enumerate(names):
        # Split by byte position, never skipping a shard and leaving a tensor for each later one.
        shard = min(done * num_shards // total, shard + 1 if shards[shard] else shard)
        shard = max(shard, num_shards - (len(names) - idx))
        shards[shard].append(name)
        done += tensors[name].numel() * tensors[name].element_size()
    weight_map = {}
    for k, shard_names in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n] for n in shard_names}, out / fname, metadata=meta)
        weight_map |= dict.fromkeys(shard_names, fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(out / "model.safetensors.index.json", index)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(out: Path, tok: Tokenizer, config: dict[str, Any], layout: str) -> None:
    tok.save(str(out / "tokenizer.json"), pretty=True)
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }  # fmt: skip
    special = {"bos_token": BOS, "eos_token": IM_END, "pad_token": PAD}
    tok_config: dict[str, Any] = {
        "added_tokens_decoder": added,
        **special,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast" if layout == "v4" else "TokenizersBackend",
    }
    if layout == "v4":
        tok_config["chat_template"] = CHAT_TEMPLATE
        _write_json(out / "special_tokens_map.json", special)
    else:
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    _write_json(out / "tokenizer_config.json", tok_config)


def make_model(
    out_dir: str | Path,
    preset: str = "tiny",
    arch: str = "llama",
    *,
    seed: int = 0,
    layout: str = "v4",
    num_shards: int = 1,
    **overrides: Any,
) -> Path:
    """Writes a random-weight checkpoint (config, safetensors, tokenizer) into `out_dir`.

    `overrides` go into config.json (e.g. `tie_word_embeddings=True`, `rope_theta=...`,
    `rope_scaling={...}`, `num_hidden_layers=...`, `vocab_size=...`); weights are drawn from
    normal(0, initializer_range), norms are ones. The same arguments give identical files.
    """
    config = make_config(preset, arch, layout, overrides)
    tok = build_tokenizer(config["vocab_size"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Files an earlier build into the same directory may have left (other shards or layout).
    for stale in (*out.glob("model*.safetensors*"), *out.glob("chat_template.jinja")):
        stale.unlink()
    (out / "special_tokens_map.json").unlink(missing_ok=True)
    shapes = weight_shapes(config)
    std = config["initializer_range"]
    tensors = {name: _tensor(name, shape, seed, std) for name, shape in shapes.items()}
    _write_weights(out, tensors, num_shards)
    _write_json(out / "config.json", config)
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    _write_json(out / "generation_config.json", generation)
    _write_tokenizer(out, tok, config, layout)
    return out
