"""Manta's paged model against `transformers` on random checkpoints of each supported variant."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.paged_driver import PagedDriver
from workers.model.loader import load_model

BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=512,
    initializer_range=0.1,  # peaked logits, so greedy choices are not decided by rounding
    rms_norm_eps=1e-5,
)

VARIANTS = {
    "llama-gqa-untied": (transformers.LlamaConfig, {"rope_theta": 5000.0}),
    "llama-tied-llama3": (
        transformers.LlamaConfig,
        {
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "llama-linear-bias-headdim": (
        transformers.LlamaConfig,
        {
            "attention_bias": True,
            "mlp_bias": True,
            "head_dim": 24,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        },
    ),
    "qwen2-bias": (transformers.Qwen2Config, {"num_key_value_heads": 1}),
    "mistral-window": (transformers.MistralConfig, {"sliding_window": 12, "head_dim": 16}),
}
MODEL_CLASSES = {
    transformers.LlamaConfig: transformers.LlamaForCausalLM,
    transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
    transformers.MistralConfig: transformers.MistralForCausalLM,
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, Manta model) loaded from the same saved random checkpoint."""
    config_cls, extra = VARIANTS[request.param]
    config = config_cls(**{**BASE, **extra})
    torch.manual_seed(0)
    reference = MODEL_CLASSES[config_cls](config).float().eval()
    with torch.no_grad():  # biases start at zero in transformers: make them count
        for name, param in reference.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    path = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(path)
    return reference, load_model(path)


def reference_logits(reference, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([token_ids])).logits[0].float()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def prompts(seed: int, lengths: list[int], vocab: int = 320) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_mixed_prefill_chunked_and_decode_batches(pair, block_size):
    reference, model = pair
    a, b, c = prompts(1, [13, 40, 7])
    driver = PagedDriver(model, block_size)
    for name, toks in zip("abc", (a, b, c)):
        driver.add(name, toks)
    # Step 1: a whole prefill, b's first chunk, c's whole prefill.
    out = driver.step({"a": 13, "b": 17, "c": 7})
    assert_close(out["a"], reference_logits(reference, a))
    assert_close(out["b"], reference_logits(reference, b)[:17])
    # Then decode a and c while b's prefill continues in chunks, in the same forward calls.
    full = {"a": list(a), "c": list(c)}
    for chunk in (15, 8):
        for name in "ac":
            full[name].append(int(out[name][-1].argmax()))
            driver.append(name, full[name][-1])
        before = driver.computed["b"]
        out = driver.step({"a": 1, "b": chunk, "c": 1})
        assert_close(out["b"], reference_logits(reference, b)[before : before + chunk])
        for name in "ac":
            assert_close(out[name], reference_logits(reference, full[name])[-1:])


@pytest.mark.parametrize("block_size", [1, 16])
def test_shared_prefix_blocks_read_correctly(pair, block_size):
    reference, model = pair
    (prefix,) = prompts(2, [2 * 16])
    tail_a, tail_b = prompts(3, [5, 9])
    driver = PagedDriver(model, block_size)
    driver.add("a", prefix + tail_a)
    driver.step({"a": len(prefix) + len(tail_a)})
    # b maps a's prefix blocks into its own table and computes only its own tail.
    shared = len(prefix) // block_size
    driver.add("b", prefix + tail_b, share_from="a", shared_blocks=shared)
    out = driver.step({"b": len(prefix) + len(tail_b) - shared * block_size})
    ref = reference_logits(reference, prefix + tail_b)
    assert_close(out["b"], ref[shared * block_size :])


def test_greedy_tokens_match_generate_for_32_steps(pair):
    reference, model = pair
    batch = prompts(4, [3, 17, 30])
    driver = PagedDriver(model, block_size=16)
    out = {}
    for i, toks in enumerate(batch):
        driver.add(str(i), toks)
    out = driver.step({str(i): len(t) for i, t in enumerate(batch)})
    generated = {name: [] for name in out}
    for _ in range(32):
        for name, logits in out.items():
            token = int(logits[-1].argmax())
            generated[name].append(token)
            driver.append(name, token)
        out = driver.step({name: 1 for name in out})
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    for i, toks in enumerate(batch):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([toks]), max_new_tokens=32, do_sample=False)[
                0, len(toks) :
            ]
        assert generated[str(i)] == expected.tolist()
