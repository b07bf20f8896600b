"""Expected speed of a placement: decode and prompt tokens per second.

Decoding one token reads every weight once (batch 1), so each device's time is its weight
bytes over its effective memory bandwidth; on a CPU with few cores the multiply itself can
be slower, so a CPU's time is the larger of the two (a roofline). Prompt processing is
compute bound: 2 FLOPs per weight per token plus attention over half a 512-token prompt,
over the device's effective throughput. Layers run one device after another (llama.cpp's
layer split), so the times of the devices add up.

Peak figures come from the device table (catalog/devices.json) or, for the CPU, from the
probe `llmup detect` runs once (hardware/cpuspeed.py); a CPU that was described rather than
measured (a machine profile's `ram_type` and `cpu_name`) gets the table's typical figures for
that memory and core class, and the speed says it is assumed. The efficiencies below turn peaks
into what llama.cpp reaches; each is calibrated against published or measured speeds,
and benchmarks/plan_speed.py checks them against measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.catalog.devices import device_table
from launcher.hardware.snapshot import HardwareSnapshot
from launcher.planning.memory import DeviceMemory

PROMPT_TOKENS = 512  # the prompt length prompt speed is quoted for (llama-bench's pp512)
PCIE_GBS = 25.0  # PCIe 4.0 x16 in practice; partial offload streams host layers over it


@dataclass(frozen=True)
class Efficiency:
    """Fractions of a device's peak figures llama.cpp reaches."""

    bandwidth: float  # decode: of the memory bandwidth
    prompt: float  # prompt processing: of the peak throughput
    decode_compute: float | None = None  # decode multiply rate (CPU only), of the peak


# cuda: llama.cpp's CUDA tg128/pp512 on RTX 3090 and 4090 (F16, Q8_0, Q4_0), ggml-org/llama.cpp
#       PR #4766: all within 25% of 0.60 x bandwidth and 0.70 x FP16 tensor TFLOPS.
# metal: the write-up's M2 Max GPU figures (7B Q4 25 ms/token, 13B Q4 42 ms/token) for the
#       bandwidth; the prompt share is assumed (no published figure was checked).
# apple_cpu: the write-up's M1 Pro CPU figures, 8 threads (43 and 73 ms/token), against the
#       chip's nominal bandwidth.
# cpu: llama.cpp on this project's CI machine (Gemma 3 270M Q4_K_M, generated Llama Q8_0 and
#       Q4_0; one thread, CPU time) against the probe's read bandwidth and float32 matmul rate
#       at the same thread count. The matmul rate is a yardstick, not a peak: llama.cpp's
#       quantized kernels multiply 8-bit integers, 1.2-2x faster than numpy's float32 GEMM.
# cpu_table: a described CPU, against the table's peak bandwidth (channels x speed grade):
#       public llama.cpp reports reach 0.57-0.72 of it (AMD EPYC 9554, 12 channels of DDR5-4800,
#       460.8 GB/s: Phi-4 14B Q4_K_M 28.7 and Q8_0 19.2 tokens/s, https://ahelpme.com/?p=6685;
#       Ryzen 7 5700G, DDR4-3800 dual channel, 60.8 GB/s: 7B Q4_0 (3.79 GB) 11.5 tokens/s,
#       getumbrel/llama-gpt PR #87); 0.60 errs low. The table's per-core GFLOPS stand in for
#       the probe's per-core GEMM rate, so the prompt and decode multiply shares are cpu's.
EFFICIENCY = {
    "cuda": Efficiency(bandwidth=0.60, prompt=0.70),
    "metal": Efficiency(bandwidth=0.37, prompt=0.60),
    "apple_cpu": Efficiency(bandwidth=0.42, prompt=0.0),  # no Apple CPU FLOPS in the table
    "cpu": Efficiency(bandwidth=0.42, prompt=1.5, decode_compute=0.40),
    "cpu_table": Efficiency(bandwidth=0.60, prompt=1.5, decode_compute=0.40),
}


@dataclass(frozen=True)
class DeviceRate:
    """One device's effective rates (after efficiency); None where no figure is known."""

    device: str
    bytes_per_s: float | None
    flops_per_s: float | None
    decode_flops_per_s: float | None = None
    basis: str = ""
    assumed: bool = False  # typical figures of a described machine, not measured


@dataclass(frozen=True)
class Speed:
    decode_tokens_per_s: float | None
    prompt_tokens_per_s: float | None
    basis: tuple[str, ...] = ()
    assumed: bool = False  # some device's figures are assumed (see DeviceRate.assumed)


def device_rates(snapshot: HardwareSnapshot) -> dict[str, DeviceRate]:
    """Rates of every GPU of the snapshot and of the CPU ('cpu'), by plan device name."""
    rates = {gpu.device: _gpu_rate(gpu.device, gpu.name) for gpu in snapshot.gpus}
    rates["cpu"] = _cpu_rate(snapshot)
    return rates


def _gpu_rate(device: str, name: str) -> DeviceRate:
    spec = device_table().lookup(name)
    if spec is None:
        return DeviceRate(device, None, None, basis=f"{device} {name}: not in the device table")
    eff = EFFICIENCY[spec.kind]
    flops = spec.tflops * 1e12 * eff.prompt if spec.tflops else None
    basis = f"{device} {spec.name}: {spec.bandwidth_gbs:g} GB/s x {eff.bandwidth:.2f}" + (
        f", {spec.tflops:g} TFLOPS x {eff.prompt:.2f}" if spec.tflops else ", TFLOPS unknown"
    )
    return DeviceRate(device, spec.bandwidth_gbs * 1e9 * eff.bandwidth, flops, basis=basis)


def _cpu_rate(snapshot: HardwareSnapshot) -> DeviceRate:
    s = snapshot.system
    if s.memory_bandwidth_gbs:
        eff = EFFICIENCY["cpu"]
        gflops = s.cpu_gflops or 0.0
        basis = (
            f"cpu: measured {s.memory_bandwidth_gbs:g} GB/s x {eff.bandwidth:.2f}, "
            f"{gflops:g} GFLOPS x {eff.prompt:.2f} (prompt) / {eff.decode_compute:.2f} (decode)"
        )
        return _cpu(s.memory_bandwidth_gbs, gflops, eff, basis)
    chip = _apple_chip(snapshot)
    if chip is not None:
        eff = EFFICIENCY["apple_cpu"]
        basis = f"cpu: {chip.name} {chip.bandwidth_gbs:g} GB/s x {eff.bandwidth:.2f} (table)"
        return DeviceRate("cpu", chip.bandwidth_gbs * 1e9 * eff.bandwidth, None, basis=basis)
    described = _described_cpu(snapshot)
    if described is not None:
        return described
    return DeviceRate(
        "cpu",
        None,
        None,
        basis="cpu: not measured (run `llmup detect` there, or describe its memory: "
        "system.ram_type, e.g. DDR4-3200 dual channel)",
    )


def _cpu(
    bandwidth_gbs: float, gflops: float, eff: Efficiency, basis: str, *, assumed: bool = False
) -> DeviceRate:
    """A CPU's rates from its bandwidth and GFLOPS (0: unknown, no compute figures)."""
    return DeviceRate(
        "cpu",
        bandwidth_gbs * 1e9 * eff.bandwidth,
        gflops * 1e9 * eff.prompt or None,
        gflops * 1e9 * (eff.decode_compute or 0) or None,
        basis=basis,
        assumed=assumed,
    )


def _described_cpu(snapshot: HardwareSnapshot) -> DeviceRate | None:
    """A CPU described rather than measured: the table's peak bandwidth for its memory and,
    when its name names a core class, that class's GFLOPS per core; assumed, and said so."""
    s = snapshot.system
    memory = device_table().memory(s.ram_type) if s.ram_type else None
    if memory is None:
        return None
    eff = EFFICIENCY["cpu_table"]
    core = device_table().core(s.cpu_name) if s.cpu_name else None
    compute = (
        f", {s.cpu_cores} x {core.gflops:g} GFLOPS ({core.name}) x {eff.prompt:.2f} / "
        f"{eff.decode_compute:.2f}"
        if core
        else ", GFLOPS unknown (no core class in system.cpu_name)"
    )
    basis = (
        f"cpu: assumed {memory.name} {memory.bandwidth_gbs:g} GB/s x {eff.bandwidth:.2f}"
        f"{compute} (the device table's typical figures, not measured)"
    )
    gflops = core.gflops * s.cpu_cores if core else 0.0
    return _cpu(memory.bandwidth_gbs, gflops, eff, basis, assumed=True)


def _apple_chip(snapshot: HardwareSnapshot):
    names = [g.name for g in snapshot.gpus if g.vendor == "apple"] + [snapshot.system.cpu_name]
    for name in filter(None, names):
        spec = device_table().lookup(name)
        if spec is not None and spec.kind == "metal":
            return spec
    return None


@dataclass(frozen=True)
class Work:
    """What one device does per token: weight bytes read and FLOPs (decode, prompt)."""

    device: str
    read_bytes: int
    decode_flops: float
    prompt_flops: float


def placement_work(
    devices: list[DeviceMemory], *, params: int, host_unread: int, n_embd: int
) -> list[Work]:
    """Split the model's FLOPs over devices by their share of the weight bytes read.

    `host_unread` is what the host holds but does not read per token (token_embd: one row).
    """
    reads = [max(d.weights - (host_unread if d.device == "cpu" else 0), 0) for d in devices]
    total = sum(reads) or 1
    out = []
    for dev, read in zip(devices, reads):
        flops = 2.0 * params * read / total
        attention = 4.0 * n_embd * (PROMPT_TOKENS / 2) * dev.layers
        out.append(Work(dev.device, read, flops, flops + attention))
    return out


def estimate(
    work: list[Work], rates: dict[str, DeviceRate], *, n_ubatch: int, unified: bool = False
) -> Speed:
    """Tokens per second for decode and for a 512-token prompt; None when a rate is unknown.

    `unified`: the GPU reads host memory in place (Apple), so host layers are no PCIe copy.
    """
    used = [w for w in work if w.read_bytes]
    basis = tuple(dict.fromkeys(rates[w.device].basis for w in used))
    decode = _total(_decode_time(w, rates[w.device]) for w in used)
    over_pcie = not unified and any(w.device != "cpu" for w in used)
    prompt = _total(_prompt_time(w, rates[w.device], over_pcie, n_ubatch) for w in used)
    assumed = any(rates[w.device].assumed for w in used)
    return Speed(_per_s(decode), _per_s(prompt), basis, assumed)


def _decode_time(w: Work, rate: DeviceRate) -> float | None:
    if rate.bytes_per_s is None:
        return None
    memory = w.read_bytes / rate.bytes_per_s
    compute = w.decode_flops / rate.decode_flops_per_s if rate.decode_flops_per_s else 0.0
    return max(memory, compute)


def _prompt_time(w: Work, rate: DeviceRate, over_pcie: bool, n_ubatch: int) -> float | None:
    """Host layers beside a discrete GPU: llama.cpp copies their weights to the GPU for each
    batch of prompt tokens (it offloads batches of 32 or more), so PCIe bounds them."""
    if w.device == "cpu" and over_pcie:
        return w.read_bytes / (PCIE_GBS * 1e9) / min(PROMPT_TOKENS, n_ubatch)
    if rate.flops_per_s is None:
        return None
    return w.prompt_flops / rate.flops_per_s


def _total(times) -> float | None:
    times = list(times)
    if not times or any(t is None for t in times):
        return None
    return sum(times)


def _per_s(seconds: float | None) -> float | None:
    return round(1.0 / seconds, 2) if seconds else None
