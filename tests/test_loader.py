"""Checkpoint loading: sharded files, bfloat16, and clear errors for broken checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.paged_driver import PagedDriver
from workers.model.config import ModelConfig
from workers.model.loader import load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return model, path


def logits_of(model, token_ids):
    driver = PagedDriver(model, block_size=16)
    driver.add("s", token_ids)
    return driver.step({"s": len(token_ids)})["s"]


def copy_checkpoint(src, dst, mutate=None):
    tensors = load_file(str(src / "model.safetensors"))
    if mutate:
        mutate(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_sharded_checkpoint_loads_identically(checkpoint, tmp_path):
    reference, path = checkpoint
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    tokens = list(range(1, 20))
    assert torch.equal(logits_of(load_model(tmp_path), tokens), logits_of(load_model(path), tokens))


def test_bfloat16_is_close_to_float32(checkpoint):
    _, path = checkpoint
    model = load_model(path, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    driver = PagedDriver(model, block_size=16)
    driver.kv = [t.to(torch.bfloat16) for t in driver.kv]
    driver.add("s", list(range(1, 20)))
    low = driver.step({"s": 19})["s"]
    high = logits_of(load_model(path), list(range(1, 20)))
    assert low.dtype == torch.float32
    assert ((low - high).abs().max() / high.abs().max()) < 0.05


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({**transformers.LlamaConfig().to_dict(), "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        ModelConfig.from_pretrained(tmp_path)


def test_shape_mismatch_names_the_tensor(checkpoint, tmp_path):
    _, path = checkpoint
    name = "model.layers.1.self_attn.k_proj.weight"

    def shrink(tensors):
        tensors[name] = tensors[name][:-1]

    copy_checkpoint(path, tmp_path, shrink)
    with pytest.raises(ValueError, match=rf"{name}.*shape \(31, 64\).*expected \(32, 64\)"):
        load_model(tmp_path)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    _, path = checkpoint
    copy_checkpoint(path, tmp_path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.gate_up_proj\.weight \(rows from 96\)"):
        load_model(tmp_path)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    _, path = checkpoint
    copy_checkpoint(path, tmp_path, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.extra.weight'"):
        load_model(tmp_path)
