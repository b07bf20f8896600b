"""Why a llama.cpp plan beats the 4-bit GPTQ on exllamav2 that also fits, in the plan's notes.

The public write-up this project starts from serves 70B on one 48 GB RTX A6000 as GPTQ 4-bit
on exllamav2; llmup plans GGUF Q4_K_M on llama.cpp there. The policy decides it (the larger
model, then more bits per weight, and only then the backend), and a reader of the plan should
see the comparison in figures: the GPTQ candidates the planner evaluated on the same machine,
their bits per weight and expected speed, the maintenance state of exllamav2, and exactly what
`--backend exllamav2` would serve.
"""

from __future__ import annotations

from launcher.hardware.images import EXLLAMAV2_VERSION
from launcher.planning.candidates import Candidate
from launcher.units import GIB

MAINTENANCE = (
    f"exllamav2 {EXLLAMAV2_VERSION} is its last release (upstream moved to exllamav3, which "
    "cannot load GPTQ)"
)


def gptq_note(chosen: Candidate, fitting: list[Candidate]) -> str | None:
    """The note for a llama.cpp plan of a model whose GPTQ also fits the same way, else None.
    `fitting` is in rank order, so its first GPTQ is what `--backend exllamav2` serves."""
    if chosen.backend != "llama.cpp":
        return None
    rivals = [
        c
        for c in fitting
        if c.backend == "exllamav2" and c.params == chosen.params and c.offload == chosen.offload
    ]
    if not rivals:
        return None
    bits = _span(sorted(c.bits_per_weight for c in rivals), "{:.2f}")
    mine = f", {_tps(chosen.decode_tps)}" if chosen.decode_tps is not None else ""
    return (
        f"{chosen.model_id} {chosen.quant} on llama.cpp ({chosen.bits_per_weight:.2f} "
        f"bits/weight{mine}) is chosen over its GPTQ on exllamav2, which fits too: more bits "
        f"per weight rank before the backend, and every GPTQ branch that fits has fewer "
        f"({bits} bits/weight{_speeds(chosen, rivals)}); {MAINTENANCE}. {_pinned(rivals[0])}"
    )


def _speeds(chosen: Candidate, rivals: list[Candidate]) -> str:
    """The GPTQ branches' expected decode speeds against the chosen one's (nothing when a
    speed is unknown)."""
    speeds = sorted(c.decode_tps for c in rivals if c.decode_tps is not None)
    if chosen.decode_tps is None or len(speeds) < len(rivals):
        return ""
    span = f", ~{_span(speeds, '{:.3g}')} tokens/s"
    if speeds[-1] <= chosen.decode_tps:
        return f"{span}: none faster"
    return f"{span}: at most {round(100 * (speeds[-1] / chosen.decode_tps - 1))}% faster"


def _pinned(best: Candidate) -> str:
    """What `--backend exllamav2` serves: the best GPTQ in rank order, with its figures."""
    memory = ", ".join(
        f"{d.total / GIB:.1f} of {g.budget / GIB:.1f} GiB on {d.device}"
        for d, g in zip(best.gpus, best.gpu_devices)
    )
    speed = f", {_tps(best.decode_tps)}" if best.decode_tps is not None else ""
    return (
        f"`--backend exllamav2` serves {best.quant} ({best.bits_per_weight:.2f} bits/weight): "
        f"{memory}{speed}"
    )


def _tps(value: float) -> str:
    return f"~{value:.3g} tokens/s"


def _span(values: list[float], fmt: str) -> str:
    low, high = fmt.format(values[0]), fmt.format(values[-1])
    return low if low == high else f"{low}-{high}"
