"""Random checkpoints load in transformers exactly as written, in both layouts, reproducibly."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer as BackendTokenizer

from workers.model.corpus import iter_corpus
from workers.model.make_model import PRESETS, count_parameters, make_config, make_model

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}
# name -> (arch, make_model keyword arguments)
VARIANTS = {
    "llama-v4": ("llama", {}),
    "llama-v5-tied-llama3": (
        "llama",
        {"layout": "v5", "tie_word_embeddings": True, "rope_scaling": LLAMA3_SCALING},
    ),
    "qwen2-v5-sharded": ("qwen2", {"layout": "v5", "num_shards": 3}),
    "mistral-v4-theta": (
        "mistral",
        {"rope_theta": 12345.0, "num_hidden_layers": 3, "initializer_range": 0.1},
    ),
}


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    return tensors


class _Collect(logging.Handler):
    """Keeps the messages of the records it receives."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module, dict, list[str]]]:
    """Each variant built once and loaded in transformers, with its loading info and warnings."""
    handler = _Collect(logging.WARNING)
    records = handler.messages
    logger = transformers.logging.get_logger()
    logger.addHandler(handler)
    result = {}
    try:
        for name, (arch, kwargs) in VARIANTS.items():
            model_dir = make_model(tmp_path_factory.mktemp(name), "tiny", arch, seed=1, **kwargs)
            records.clear()
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                model_dir, output_loading_info=True
            )
            result[name] = (model_dir, model, info, list(records))
    finally:
        logger.removeHandler(handler)
    return result


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_loads_every_weight(loaded, name: str) -> None:
    model_dir, model, info, warnings = loaded[name]
    arch, kwargs = VARIANTS[name]
    assert (
        type(model).__name__
        == json.loads((model_dir / "config.json").read_text())["architectures"][0]
    )
    assert all(not info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert warnings == []  # no load report about missing, unexpected or mismatched keys
    state = model.state_dict()
    for tensor_name, tensor in _tensors(model_dir).items():
        assert torch.equal(state[tensor_name], tensor), tensor_name
    assert model.num_parameters() == count_parameters(model.config.to_dict())
    tied = kwargs.get("tie_word_embeddings", False)
    assert ("lm_head.weight" in _tensors(model_dir)) != tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.config.vocab_size == len(transformers.AutoTokenizer.from_pretrained(model_dir))
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_rope_settings_reach_transformers(loaded) -> None:
    params = loaded["llama-v5-tied-llama3"][1].config.rope_parameters
    assert params == {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING}
    assert loaded["mistral-v4-theta"][1].config.rope_parameters["rope_theta"] == 12345.0
    assert loaded["mistral-v4-theta"][1].config.num_hidden_layers == 3
    assert loaded["mistral-v4-theta"][1].config.sliding_window is None
    embed = loaded["mistral-v4-theta"][1].model.embed_tokens.weight
    assert abs(embed.std().item() - 0.1) < 0.01


def test_sharded_index(loaded) -> None:
    model_dir = loaded["qwen2-v5-sharded"][0]
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (model_dir / "model.safetensors").exists()
    tensors = _tensors(model_dir)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_layouts(tmp_path: Path, layout: str) -> None:
    model_dir = make_model(tmp_path, "tiny", layout=layout, rope_scaling=LLAMA3_SCALING)
    config = json.loads((model_dir / "config.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    if layout == "v4":
        assert config["rope_theta"] == 500000.0 and config["rope_scaling"] == LLAMA3_SCALING
        assert "rope_parameters" not in config and "chat_template" in tok_config
        assert not (model_dir / "chat_template.jinja").exists()
    else:
        assert config["rope_parameters"] == {"rope_theta": 500000.0, **LLAMA3_SCALING}
        assert "rope_theta" not in config and "rope_scaling" not in config
        assert "chat_template" not in tok_config and (model_dir / "chat_template.jinja").exists()
    generation = json.loads((model_dir / "generation_config.json").read_text())
    tok = BackendTokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|im_end|>")]
    assert generation["eos_token_id"] == config["eos_token_id"] == ids
    assert generation["bos_token_id"] == tok.token_to_id("<|begin_of_text|>")
    assert config["vocab_size"] == tok.get_vocab_size() == PRESETS["tiny"]["vocab_size"]


def test_layouts_give_the_same_model(loaded, tmp_path: Path) -> None:
    """Same seed, other layout: same weights and, through the rope translation, same logits."""
    kwargs = dict(VARIANTS["mistral-v4-theta"][1], seed=1, layout="v5")
    v5 = transformers.AutoModelForCausalLM.from_pretrained(
        make_model(tmp_path, "tiny", "mistral", **kwargs)
    )
    ids = torch.tensor([[1019, 5, 300, 42, 7, 900, 11]])
    with torch.no_grad():
        v4_logits = loaded["mistral-v4-theta"][1](ids).logits
        assert torch.equal(v4_logits, v5(ids).logits)


def test_preset_parameter_counts() -> None:
    counts = {p: count_parameters(make_config(p, "llama", "v4", {})) for p in PRESETS}
    assert 100_000 < counts["tiny"] < 1_000_000
    assert 8_000_000 < counts["small"] < 12_000_000
    assert 80_000_000 < counts["bench"] < 100_000_000
    for preset, shape in PRESETS.items():
        config = make_config(preset, "qwen2", "v5", {})
        assert shape["num_key_value_heads"] < shape["num_attention_heads"]  # GQA everywhere
        assert config["head_dim"] >= (16 if preset == "tiny" else 32)
        assert count_parameters(config) > counts[preset]  # q/k/v biases
    assert make_config("bench", "llama", "v4", {})["head_dim"] == 64


def test_bench_builds_quickly(tmp_path: Path) -> None:
    start = time.perf_counter()
    model_dir = make_model(tmp_path, "bench")
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"bench took {elapsed:.1f}s"
    config = json.loads((model_dir / "config.json").read_text())
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        numel = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    assert numel == count_parameters(config)


def test_deterministic_across_processes_without_transformers(loaded, tmp_path: Path) -> None:
    """Same arguments, another process without transformers, over an older build: same bytes."""
    a = make_model(tmp_path / "a", "tiny", "qwen2", seed=3, num_shards=2)
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from workers.model.make_model import make_model\n"
        f"make_model({str(tmp_path / 'b')!r}, 'tiny', 'qwen2', seed=3, num_shards=2)\n"
    )
    b = make_model(tmp_path / "b", "tiny", layout="v5", num_shards=3)  # overwritten below
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other_seed = loaded["qwen2-v5-sharded"][0]  # seed 1
    assert (a / "tokenizer.json").read_bytes() == (other_seed / "tokenizer.json").read_bytes()
    ta, tb = _tensors(a), _tensors(other_seed)
    assert not torch.equal(ta["model.embed_tokens.weight"], tb["model.embed_tokens.weight"])
    assert torch.equal(ta["model.norm.weight"], torch.ones(64))
    assert abs(ta["model.embed_tokens.weight"].std().item() - 0.02) < 0.002


def test_corpus_is_deterministic_and_mixed() -> None:
    lines = list(iter_corpus(2000))
    assert lines == list(iter_corpus(2000)) and lines != list(iter_corpus(2000, seed=1))
    text = "\n".join(lines)
    assert any(ch in text for ch in "😀🚀🔥") and any(ch in text for ch in "的一是")
    assert "def " in text and "return" in text and any(c.isdigit() for c in text)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preset": "huge"}, "preset"),
        ({"arch": "gpt2"}, "arch"),
        ({"layout": "v6"}, "layout"),
        ({"num_shards": 1000}, "num_shards"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"vocab_size": 100}, "vocab_size"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_model(tmp_path, **kwargs)
