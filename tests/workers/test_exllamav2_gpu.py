"""The real ExllamaGenerator on a CUDA GPU, with a tiny random GPTQ Llama built on the fly.

Deselected by default; run with ``pytest -m gpu`` on a machine with an NVIDIA GPU, a CUDA build
of torch and exllamav2 (``pip install 'llmup[exllamav2]'``). The weights are random, so the text
is gibberish: these tests check the plumbing (load by autosplit and by a manual split, every
cache mode, token accounting, cancellation, seeds, and the HTTP layer on the real engine).
Nothing is imported at collection time, so a CPU-only run never touches torch.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from launcher.workers.exllamav2.engine import ExllamaGenerator, GenerationParams, LoadOptions
from launcher.workers.exllamav2.server import create_app

pytestmark = pytest.mark.gpu

HIDDEN, INTERMEDIATE, HEADS, LAYERS, VOCAB, GROUP = 256, 512, 4, 2, 512, 128
CORPUS = "The quick brown fox jumps over the lazy dog. Hello world, llmup serves Llama. " * 8
ALIAS = "tiny-gptq"


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("exllamav2")
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    # `-m gpu` claims a CUDA machine: without one this is a failure, not a silent skip
    assert torch.cuda.is_available(), "pytest -m gpu needs a CUDA device"
    return torch


def _write_tokenizer(folder: Path) -> None:
    """A byte-level BPE with Llama's control tokens at ids 0-2 (exllamav2 >= 0.3.1 reads
    only tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(special))


def _gptq_linear(torch, gen, prefix: str, in_f: int, out_f: int) -> dict:
    """GPTQ v1 layout, 4 bits, group 128: 8 weights per int32 along the input dimension,
    zero point 8 stored as 7 in every nibble, small fp16 scales, sequential g_idx."""
    qweight = torch.randint(
        -(2**31), 2**31 - 1, (in_f // 8, out_f), dtype=torch.int32, generator=gen
    )
    groups = in_f // GROUP
    return {
        f"{prefix}.qweight": qweight,
        f"{prefix}.qzeros": torch.full((groups, out_f // 8), 0x77777777, dtype=torch.int32),
        f"{prefix}.scales": (torch.rand((groups, out_f), generator=gen) * 0.02 + 0.005).half(),
        f"{prefix}.g_idx": (torch.arange(in_f, dtype=torch.int32) // GROUP),
    }


def _tensors(torch) -> dict:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).half(),
        "model.norm.weight": torch.ones(HIDDEN).half(),
        "lm_head.weight": (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).half(),
    }
    shapes = {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (HIDDEN, HIDDEN),
        "self_attn.v_proj": (HIDDEN, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
        "mlp.up_proj": (HIDDEN, INTERMEDIATE),
        "mlp.down_proj": (INTERMEDIATE, HIDDEN),
    }
    for layer in range(LAYERS):
        base = f"model.layers.{layer}"
        tensors[f"{base}.input_layernorm.weight"] = torch.ones(HIDDEN).half()
        tensors[f"{base}.post_attention_layernorm.weight"] = torch.ones(HIDDEN).half()
        for name, (in_f, out_f) in shapes.items():
            tensors.update(_gptq_linear(torch, gen, f"{base}.{name}", in_f, out_f))
    return tensors


@pytest.fixture(scope="module")
def tiny_gptq(torch, tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny-gptq")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": GROUP},
    }
    (folder / "config.json").write_text(json.dumps(config))
    quantize = {"bits": 4, "group_size": GROUP, "desc_act": False, "sym": True}
    (folder / "quantize_config.json").write_text(json.dumps(quantize))
    save_file(_tensors(torch), str(folder / "model.safetensors"))
    _write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def generator(tiny_gptq) -> ExllamaGenerator:
    return ExllamaGenerator.load(LoadOptions(tiny_gptq, max_seq_len=512))


def _run(generator, prompt: str, **params) -> list:
    ids = generator.encode(prompt, bos=True)
    settings = GenerationParams(**{"max_new_tokens": 8, "temperature": 0, **params})
    return list(generator.generate(ids, settings, threading.Event()))


def test_encode_adds_bos_and_counts(generator):
    ids = generator.encode("Hello world", bos=True)
    assert ids[0] == 1 and len(ids) > 2
    assert generator.count_tokens("<s>Hello world") == len(ids) + 1  # parsed <s>, plus BOS
    assert generator.vocab_size >= 400


def test_generates_and_accounts_tokens(generator):
    events = _run(generator, "The quick brown fox")
    assert events[-1].finish_reason in ("stop", "length")
    assert all(e.finish_reason is None for e in events[:-1])
    total = sum(e.tokens for e in events)
    assert total <= 8
    if events[-1].finish_reason == "length":
        assert total == 8


def test_greedy_is_deterministic_and_sampling_runs(generator):
    first, second = (_run(generator, "Hello") for _ in range(2))
    assert [e.text for e in first] == [e.text for e in second]
    sampled = _run(generator, "Hello", temperature=0.8, top_p=0.9, seed=5, presence_penalty=0.5)
    assert sampled[-1].finish_reason in ("stop", "length")


def test_closing_the_stream_cancels_the_job(generator):
    ids = generator.encode("Hello", bos=True)
    stream = generator.generate(ids, GenerationParams(max_new_tokens=64), threading.Event())
    next(stream)
    stream.close()
    assert generator._engine.num_remaining_jobs() == 0
    assert _run(generator, "Hello")  # the engine still serves


def test_cancel_event_stops_before_any_token(generator):
    cancel = threading.Event()
    cancel.set()
    ids = generator.encode("Hello", bos=True)
    assert list(generator.generate(ids, GenerationParams(max_new_tokens=8), cancel)) == []
    assert generator._engine.num_remaining_jobs() == 0


@pytest.mark.parametrize("cache_mode", ["FP16", "Q8", "Q6", "Q4"])
def test_cache_modes_and_manual_split(tiny_gptq, torch, cache_mode):
    options = LoadOptions(tiny_gptq, max_seq_len=300, cache_mode=cache_mode, gpu_split=[2.0])
    generator = ExllamaGenerator.load(options)
    assert _run(generator, "Hello", max_new_tokens=4)
    del generator
    torch.cuda.empty_cache()


def test_http_layer_on_the_real_engine(generator):
    from fastapi.testclient import TestClient

    app = create_app(generator, model_alias=ALIAS, max_seq_len=512)
    with TestClient(app) as client:
        body = {"model": ALIAS, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        reply = client.post("/v1/chat/completions", json=body).json()
        assert reply["usage"]["completion_tokens"] <= 4
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        count = client.post("/extras/tokenize/count", json={"input": "Hello"}).json()["count"]
        assert count == len(generator.encode("Hello", bos=True))
