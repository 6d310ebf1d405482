"""The engine with the Triton attention backend (kernels run by Triton's CPU interpreter) gives
exactly transformers' greedy tokens: chunked prefill, prefix hits, speculative verification;
and how devices and backends are chosen, with the errors a missing one gives."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from workers import LLM, SamplingParams  # noqa: E402
from workers.attention.selector import resolve_backend_name  # noqa: E402
from workers.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from workers.cuda_graphs import DecodeGraphs, capture_sizes  # noqa: E402
from workers.device import resolve_device, resolve_dtype  # noqa: E402

SYSTEM = list(range(40, 77))  # 37 tokens: a shared prefix that ends mid-block
PROMPTS = [SYSTEM + [5, 9, 200], [7, 8], SYSTEM + [300, 301, 302, 303, 11], list(range(100, 130))]
STEPS = 12


@pytest.fixture(scope="module")
def expected(tiny_model):
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_model).float().eval()
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    outs = []
    for prompt in PROMPTS:
        with torch.no_grad():
            ids = reference.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False)
        outs.append(ids[0, len(prompt) :].tolist())
    return outs


def greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize(
    "extra",
    [
        {},  # whole prompts in one step
        {"max_num_batched_tokens": 24, "max_num_seqs": 4},  # chunked prefill over cached prefixes
        {"speculative": {"method": "ngram", "num_speculative_tokens": 3}},  # verification rows
    ],
    ids=["one-step", "chunked", "speculative"],
)
def test_triton_backend_greedy_equals_transformers(tiny_model, expected, extra):
    llm = LLM(tiny_model, attention_backend="triton", num_blocks=64, **extra)
    assert isinstance(llm.engine.attention, TritonAttentionBackend)
    assert greedy(llm) == expected
    # The second round finds the shared prefix cached, mid-block tails recomputed.
    assert greedy(llm) == expected
    stats = llm.stats()
    assert stats["prefix_cache_hits"] > 0
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_auto_settings_on_a_cpu_machine():
    assert not torch.cuda.is_available()  # this suite runs on CPU machines
    device = resolve_device("auto")
    assert device.type == "cpu"
    assert resolve_dtype("auto", device) == torch.float32
    assert resolve_dtype("bfloat16", device) == torch.bfloat16
    assert resolve_backend_name("auto", device, 16) == "torch"
    assert resolve_backend_name("triton", device, 16) == "triton"  # under the interpreter


def test_missing_devices_and_backends_fail_at_start_naming_the_fix(tiny_model, monkeypatch):
    with pytest.raises(ValueError, match="CUDA is not available.*install a CUDA build"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="'flash_attn' needs a CUDA device"):
        resolve_backend_name("flash_attn", torch.device("cpu"), 16)
    with pytest.raises(ValueError, match="CUDA is not available"):
        LLM(tiny_model, device="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        LLM(tiny_model, attention_backend="triton")


def test_padded_decode_replays_give_the_same_tokens(tiny_model, expected):
    """The CUDA-graph path without the graph: decode steps copied into static buffers padded
    to the next captured size (here 1, 2, 4, 6), with padding rows that write no KV."""
    llm = LLM(tiny_model, attention_backend="triton", num_blocks=64, max_num_seqs=6)
    engine = llm.engine
    graphs = DecodeGraphs(
        engine.model, engine.kv_caches, engine.attention, 6, engine.max_model_len, 16, capture=False
    )
    assert graphs.sizes == [1, 2, 4, 6]
    engine.runner.graphs = graphs
    assert greedy(llm) == expected
    assert graphs.num_replays >= STEPS - 1  # every step after the prefill
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
    # Three sequences padded to four give what they give unpadded.
    cut = [p[:5] for p in PROMPTS[:3]]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    padded = [o.outputs[0].token_ids for o in llm.generate(cut, params)]
    engine.runner.graphs = None
    assert padded == [o.outputs[0].token_ids for o in llm.generate(cut, params)]


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert capture_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
