"""llama.cpp load-log parsing: captured real logs, old formats, and one real measured load."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.ggufgen import model_tensor_bytes, write_llama_gguf

from launcher.calibration.llamacpp_log import LoadBuffers, parse_load_log
from launcher.units import MIB

LOGS = Path(__file__).parents[1] / "data" / "llamacpp-logs"
FIXTURES = sorted(LOGS.glob("*.log"))
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed")
# The shape the captured fixtures were made from (see tests/data/llamacpp-logs/README.md).
FIXTURE_SHAPE = dict(n_layer=4, n_embd=512, n_head=8, n_head_kv=8, n_ff=1024, n_vocab=32000)


def _fixture(name: str) -> LoadBuffers:
    return parse_load_log((LOGS / name).read_text())


def test_fixtures_present() -> None:
    assert len(FIXTURES) >= 4


def test_default_load_pads_context_and_disables_flash_attn() -> None:
    b = _fixture("cpu-f16-ctx300-default.log")
    assert b.model == {"AMX": 51.25, "CPU_Mapped": 79.52}
    assert b.kv == {"CPU": 4.0}
    assert b.output == {"CPU": 0.12}
    assert b.compute == {"CPU": 38.38}
    assert b.compute_exact == {"CPU": 38.3801}
    assert (b.n_ctx, b.n_ctx_seq, b.kv_size, b.kv_layers, b.kv_seqs) == (512, 512, 512, 4, 1)
    assert (b.n_batch, b.n_ubatch, b.n_seq_max) == (300, 300, 1)
    assert (b.flash_attn_setting, b.flash_attn) == ("disabled", False)
    assert (b.type_k, b.type_v, b.k_mib, b.v_mib) == ("f16", "f16", 2.0, 2.0)
    assert b.model_info["n_vocab"] == "32000"
    assert b.total == pytest.approx(51.25 + 79.52 + 4.0 + 38.38 + 0.12)


def test_flash_attn_auto_is_resolved() -> None:
    b = _fixture("cpu-q4_0-ctx4096-fa-auto.log")
    assert (b.flash_attn_setting, b.flash_attn_resolved, b.flash_attn) == ("auto", True, True)
    assert b.model == {"AMX": 14.41, "CPU_Mapped": 22.38}
    assert (b.kv_total, b.kv_size, b.n_ubatch) == (32.0, 4096, 512)
    assert b.compute_exact == {"CPU": 64.502}


def test_quantized_kv_cache() -> None:
    b = _fixture("cpu-q8_0-gqa-ctx2048-kv-q8_0-fa.log")
    assert (b.type_k, b.type_v, b.kv_size, b.flash_attn) == ("q8_0", "q8_0", 2048, True)
    # 4 layers * 2048 cells * (2 heads * 64) * 34/32 bytes, for K and for V.
    expected_k = 4 * 2048 * 128 * 34 / 32 / MIB
    assert b.k_mib == pytest.approx(expected_k, abs=0.005)
    assert b.kv_total == pytest.approx(2 * expected_k, abs=0.005)


def test_no_repack_model_buffer_is_the_tensor_bytes() -> None:
    b = _fixture("cpu-f16-ctx512-no-repack.log")
    tensors = model_tensor_bytes(**FIXTURE_SHAPE, tensor_type="F16") / MIB
    assert list(b.model) == ["CPU_Mapped"]
    assert b.model_total == pytest.approx(tensors, abs=0.005)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixture_invariants(path: Path) -> None:
    b = parse_load_log(path.read_text())
    assert b.model and b.kv and b.compute and b.output
    assert b.kv_size is not None and b.kv_size % 256 == 0
    assert b.kv_total == pytest.approx((b.k_mib or 0) + (b.v_mib or 0), abs=0.011)
    assert b.compute_total == pytest.approx(b.compute_exact["CPU"], abs=0.005)
    assert b.flash_attn is not None


OLD_LOG = """\
llm_load_print_meta: n_vocab          = 32000
llm_load_print_meta: n_layer          = 40
llm_load_tensors: ggml ctx size =    0.37 MiB
llm_load_tensors: offloading 40 repeating layers to GPU
llm_load_tensors: offloaded 41/41 layers to GPU
llm_load_tensors:        CPU buffer size =    87.89 MiB
llm_load_tensors:      CUDA0 buffer size =  3400.00 MiB
llm_load_tensors:      CUDA1 buffer size =  3512.00 MiB
.......................................................................................
llama_new_context_with_model: n_ctx      = 4096
llama_new_context_with_model: n_batch    = 2048
llama_new_context_with_model: n_ubatch   = 512
llama_new_context_with_model: flash_attn = 0
llama_new_context_with_model: freq_base  = 10000.0
llama_kv_cache_init:      CUDA0 KV buffer size =  1600.00 MiB
llama_kv_cache_init:      CUDA1 KV buffer size =  1600.00 MiB
llama_new_context_with_model: KV self size = 3200.00 MiB, K (f16): 1600.00 MiB, V (f16): 1600.00 MiB
llama_new_context_with_model:  CUDA_Host  output buffer size =     0.12 MiB
llama_new_context_with_model: pipeline parallelism enabled (n_copies=4)
llama_new_context_with_model:      CUDA0 compute buffer size =   400.01 MiB
llama_new_context_with_model:      CUDA1 compute buffer size =   400.02 MiB
llama_new_context_with_model:  CUDA_Host compute buffer size =    42.02 MiB
llama_new_context_with_model: graph nodes  = 1286
llama_new_context_with_model: graph splits = 3
"""

OLDEST_LOG = """\
llama_kv_cache_init: kv_size = 4096, offload = 1, type_k = 'f16', type_v = 'f16', n_layer = 32
llama_new_context_with_model: n_ctx      = 4096
llama_new_context_with_model: KV self size = 2048.00 MiB, K (f16): 1024.00 MiB, V (f16): 1024.00 MiB
llama_new_context_with_model: compute buffer total size = 296.01 MiB
"""


def test_old_format_per_device() -> None:
    b = parse_load_log(OLD_LOG)
    assert b.model == {"CPU": 87.89, "CUDA0": 3400.0, "CUDA1": 3512.0}
    assert b.kv == {"CUDA0": 1600.0, "CUDA1": 1600.0}
    assert b.kv_self_mib == 3200.0 and b.kv_total == 3200.0  # not counted twice
    assert b.output == {"CUDA_Host": 0.12}
    assert b.compute == {"CUDA0": 400.01, "CUDA1": 400.02, "CUDA_Host": 42.02}
    assert (b.offloaded_layers, b.offloadable_layers, b.n_copies) == (41, 41, 4)
    assert (b.n_ctx, b.n_batch, b.n_ubatch, b.n_ctx_seq) == (4096, 2048, 512, None)
    assert (b.flash_attn_setting, b.flash_attn) == ("0", False)
    assert b.model_info == {"n_vocab": "32000", "n_layer": "40"}


def test_oldest_format_totals_only() -> None:
    b = parse_load_log(OLDEST_LOG)
    assert b.kv == {} and b.kv_total == 2048.0
    assert (b.kv_size, b.kv_layers, b.type_k, b.type_v) == (4096, 32, "f16", "f16")
    assert b.compute == {"total": 296.01}


def test_unknown_lines_and_kinds() -> None:
    text = "garbage\n\nllama_context:  CUDA_Host  input buffer size =  9.02 MiB\nx = y\n"
    b = parse_load_log(text)
    assert b.other == {"input CUDA_Host": 9.02}
    assert b.total == 0.0 and b.kv_size is None and b.flash_attn is None
    assert parse_load_log("") == LoadBuffers()


def test_repeated_buffers_add_up() -> None:
    line = "load_tensors:   CPU_Mapped model buffer size =  1000.00 MiB\n"
    assert parse_load_log(line * 3).model == {"CPU_Mapped": 3000.0}


# --- real loads (llama-cpp-python in a subprocess) -------------------------------------

PROBE_SHAPE = dict(n_layer=4, n_embd=256, n_head=8, n_head_kv=2, n_ff=512)


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    return write_llama_gguf(path, **PROBE_SHAPE, tensor_type="F16")


def _kv_mib(n_ctx: int, bytes_per_element: float) -> float:
    kv_size = -(-n_ctx // 256) * 256  # llama.cpp pads n_ctx up to a multiple of 256
    head_dim = PROBE_SHAPE["n_embd"] // PROBE_SHAPE["n_head"]
    n_embd_kv = PROBE_SHAPE["n_head_kv"] * head_dim
    return 2 * PROBE_SHAPE["n_layer"] * kv_size * n_embd_kv * bytes_per_element / MIB


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("n_ctx", [256, 300, 2048])
def test_probe_kv_buffer_matches_shape(tiny_f16: Path, n_ctx: int) -> None:
    from support.llamacpp_probe import measure_load

    b, log = measure_load(tiny_f16, n_ctx=n_ctx)
    assert "KV buffer size" in log
    assert b.kv_size == -(-n_ctx // 256) * 256 == b.n_ctx
    assert b.kv_total == pytest.approx(_kv_mib(n_ctx, 2), abs=0.005)
    assert b.flash_attn is False  # llama-cpp-python's default
    assert b.output_total == pytest.approx(
        b.n_seq_max * int(b.model_info["n_vocab"]) * 4 / MIB, abs=0.005
    )


@pytest.mark.slow
@needs_llama_cpp
def test_probe_quantized_kv_and_model_bytes(tiny_f16: Path) -> None:
    from support.llamacpp_probe import measure_load

    b, _ = measure_load(
        tiny_f16, n_ctx=300, type_k="q8_0", type_v="q8_0", flash_attn=True, use_extra_bufts=False
    )
    assert (b.type_k, b.type_v, b.flash_attn) == ("q8_0", "q8_0", True)
    assert b.kv_total == pytest.approx(_kv_mib(300, 34 / 32), abs=0.005)
    tensors = model_tensor_bytes(**PROBE_SHAPE, tensor_type="F16") / MIB
    assert b.model == {"CPU_Mapped": pytest.approx(tensors, abs=0.005)}


_GENERATE = r"""
import json, sys
import llama_cpp
from launcher.workers.llamacpp_python.server import disable_weight_repack
disable_weight_repack()
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)
text = llm("hello world", max_tokens=4)["choices"][0]["text"]
chat = llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
print(json.dumps({"text": text, "chat": chat["choices"][0]["message"]["content"],
                  "tokens": llm.tokenize(b"hello world")}))
"""
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("tensor_type", ["F32", "F16", "Q8_0", "Q4_0"])
def test_generated_model_generates(tmp_path: Path, tensor_type: str) -> None:
    # Weight repacking (use_extra_bufts) is off: on AMX CPUs this llama.cpp build segfaults in
    # ggml_backend_amx_mul_mat on the first decode of a Q8_0/Q4_0 model (llama.cpp #20824).
    path = write_llama_gguf(tmp_path / "m.gguf", tensor_type=tensor_type, chat_template=TEMPLATE)
    proc = subprocess.run(
        [sys.executable, "-c", _GENERATE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["text"] and result["chat"]
    assert result["tokens"][0] == 1 and len(result["tokens"]) == 3  # <s> ▁hello ▁world
