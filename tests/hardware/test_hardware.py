"""Hardware detection on recorded probe outputs, and the snapshot files built from them."""

from __future__ import annotations

import json
import logging
import subprocess
from types import SimpleNamespace

import pytest
from support.recorded_machines import (
    MACHINE_SPECS,
    MACHINES,
    SMI,
    SYSCTL,
    NoNvml,
    build_machine,
    darwin,
    replay,
)

from launcher.errors import DetectionError, HardwareSnapshotError
from launcher.hardware.apple import detect_apple, metal_budget_mib
from launcher.hardware.detect import detect
from launcher.hardware.nvidia import (
    BASE_FIELDS,
    FULL_FIELDS,
    detect_nvidia_gpus,
    parse_nvidia_smi_csv,
    query_nvidia_smi,
)
from launcher.hardware.snapshot import SystemInfo, load_snapshot
from launcher.hardware.system import detect_system, normalise_arch, normalise_os

GIB_MIB = 1024

# --- nvidia-smi ---------------------------------------------------------------------------


def test_parse_single_a6000_matches_design_example():
    (gpu,) = parse_nvidia_smi_csv((SMI / "a6000-idle.csv").read_text())
    assert gpu.model_dump() == {
        "index": 0,
        "vendor": "nvidia",
        "name": "NVIDIA RTX A6000",
        "memory_total_mib": 49140,
        "memory_free_mib": 48335,
        "memory_used_mib": 4,
        "compute_capability": "8.6",
        "uuid": None,  # NVML gives it; the nvidia-smi fallback does not ask
        "pci_bus_id": None,
    }
    assert gpu.device == "cuda:0"


def test_parse_two_a6000_respects_memory_in_use():
    idle, busy = parse_nvidia_smi_csv((SMI / "a6000x2-busy.csv").read_text())
    assert (idle.index, busy.index) == (0, 1)
    assert busy.memory_used_mib == 34485
    assert busy.memory_free_mib == 13854
    assert busy.memory_total_mib - busy.memory_used_mib - busy.memory_free_mib < 1024
    assert busy.device == "cuda:1"


@pytest.mark.parametrize(
    ("recording", "name", "total", "cc"),
    [
        ("rtx3060-12gb.csv", "NVIDIA GeForce RTX 3060", 12288, "8.6"),
        ("rtx4090-24gb.csv", "NVIDIA GeForce RTX 4090", 24564, "8.9"),
        ("a100-80gb.csv", "NVIDIA A100-SXM4-80GB", 81920, "8.0"),
    ],
)
def test_parse_recorded_single_gpus(recording, name, total, cc):
    (gpu,) = parse_nvidia_smi_csv((SMI / recording).read_text())
    assert (gpu.name, gpu.memory_total_mib, gpu.compute_capability) == (name, total, cc)
    assert 0 < gpu.memory_free_mib < gpu.memory_total_mib


def test_name_with_comma_and_na_values():
    text = "0, Odd, Board Name, 8192, [N/A], 8000, [N/A]\n"
    (gpu,) = parse_nvidia_smi_csv(text)
    assert gpu.name == "Odd, Board Name"
    assert gpu.memory_used_mib is None
    assert gpu.compute_capability is None
    assert gpu.memory_free_mib == 8000


def test_gpu_without_memory_figures_is_skipped_with_warning(caplog):
    text = "0, NVIDIA A100-SXM4-80GB, [N/A], [N/A], [N/A], 8.0\n1, Tesla T4, 15109, 0, 15109, 7.5\n"
    with caplog.at_level(logging.WARNING, logger="launcher.hardware.nvidia"):
        gpus = parse_nvidia_smi_csv(text)
    assert [g.index for g in gpus] == [1]
    assert "skipping GPU" in caplog.text


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("0, NVIDIA RTX A6000, 49140\n", "expected 6 fields"),
        ("0, NVIDIA RTX A6000, lots, 4, 48335, 8.6\n", "lots"),
        ("0, NVIDIA RTX A6000, 49140, 4, -5, 8.6\n", "memory_free_mib"),
    ],
)
def test_malformed_row_raises_detection_error(text, needle):
    with pytest.raises(DetectionError, match=needle) as info:
        parse_nvidia_smi_csv(text)
    assert "\n" not in str(info.value)


def test_blank_output_means_no_gpus():
    assert parse_nvidia_smi_csv("\n\n") == []


def test_old_driver_retries_without_compute_cap():
    error = (SMI / "old-driver-compute-cap-error.txt").read_text()
    calls: list[list[str]] = []

    def run(cmd: list[str]) -> str:
        calls.append(cmd)
        if "compute_cap" in cmd[1]:
            raise subprocess.CalledProcessError(2, cmd, output=error)
        return (SMI / "old-driver-t4.csv").read_text()

    (gpu,) = query_nvidia_smi(run)
    assert [c[1] for c in calls] == [
        "--query-gpu=" + ",".join(FULL_FIELDS),
        "--query-gpu=" + ",".join(BASE_FIELDS),
    ]
    assert (gpu.name, gpu.memory_free_mib, gpu.compute_capability) == ("Tesla T4", 15109, None)


def test_broken_driver_raises_detection_error_naming_the_problem():
    def run(cmd: list[str]) -> str:
        msg = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
        raise subprocess.CalledProcessError(9, cmd, output=msg)

    with pytest.raises(DetectionError, match="couldn't communicate") as info:
        query_nvidia_smi(run)
    assert "--hardware FILE" in str(info.value)


def test_hung_nvidia_smi_raises_detection_error():
    def run(cmd: list[str]) -> str:
        raise subprocess.TimeoutExpired(cmd, 15)

    with pytest.raises(DetectionError, match="timed out"):
        query_nvidia_smi(run)


def test_no_nvidia_smi_means_no_gpus():
    assert detect_nvidia_gpus(run=replay(None), nvml=NoNvml()) == []


def test_nvml_failure_falls_back_to_nvidia_smi():
    gpus = detect_nvidia_gpus(run=replay(SMI / "a6000x2-busy.csv"), nvml=NoNvml())
    assert [g.memory_used_mib for g in gpus] == [4, 34485]


class FakeNvml:
    """Just the pynvml calls detection makes, answering for one A6000 (bytes, like NVML)."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.shut_down = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"handle{index}"

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"NVIDIA RTX A6000"  # older pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        mib = 1024 * 1024
        return SimpleNamespace(total=49140 * mib, used=805 * mib, free=48335 * mib)

    def nvmlDeviceGetCudaComputeCapability(self, handle: str) -> tuple[int, int]:
        return (8, 6)

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        return "GPU-8f3a6d1c-2b4e-4c1a-9e7f-0123456789ab"

    def nvmlDeviceGetPciInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(busId=b"00000000:01:00.0")


def test_nvml_is_preferred_over_nvidia_smi():
    nvml = FakeNvml()

    def run(cmd: list[str]) -> str:
        raise AssertionError("nvidia-smi must not run when NVML works")

    (gpu,) = detect_nvidia_gpus(run=run, nvml=nvml)
    assert (gpu.name, gpu.memory_free_mib, gpu.compute_capability) == (
        "NVIDIA RTX A6000",
        48335,
        "8.6",
    )
    assert gpu.uuid == "GPU-8f3a6d1c-2b4e-4c1a-9e7f-0123456789ab"
    assert gpu.pci_bus_id == "00000000:01:00.0"
    assert nvml.shut_down


# --- Apple --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ram_gib", "budget_mib"),
    [
        (8, 5461),
        (16, 10922),  # ggml logs recommendedMaxWorkingSetSize = 10922.67 MiB
        (24, 16384),
        (32, 21845),  # ggml logs 21845.34 MiB
        (36, 24576),  # still 2/3 at the threshold
        (64, 49152),  # ggml logs 49152.00 MiB
        (128, 98304),
    ],
)
def test_metal_budget_default_rule(ram_gib, budget_mib):
    assert metal_budget_mib(ram_gib * 1024**3, 0) == budget_mib


def test_metal_budget_wired_limit_overrides_and_is_capped_at_ram():
    assert metal_budget_mib(64 * 1024**3, 57344) == 57344
    assert metal_budget_mib(16 * 1024**3, 8000) == 8000
    assert metal_budget_mib(16 * 1024**3, 999999) == 16 * GIB_MIB


def test_detect_apple_from_recorded_sysctl():
    gpu, unified = detect_apple(run=replay(SYSCTL / "apple-m2-16gb.txt"))
    assert (gpu.vendor, gpu.name, gpu.device) == ("apple", "Apple M2", "metal:0")
    assert gpu.memory_total_mib == gpu.memory_free_mib == 10922
    assert unified.model_dump() == {"ram_total_mib": 16384, "gpu_budget_mib": 10922}


def test_detect_apple_uses_wired_limit_when_set():
    gpu, unified = detect_apple(run=replay(SYSCTL / "apple-m2max-64gb.txt"))
    assert gpu.name == "Apple M2 Max"
    assert unified.gpu_budget_mib == gpu.memory_total_mib == 57344


def test_detect_apple_without_wired_limit_key(tmp_path):
    recording = tmp_path / "ventura.txt"
    recording.write_text("hw.memsize: 34359738368\nmachdep.cpu.brand_string: Apple M1 Max\n")
    _, unified = detect_apple(run=replay(recording))
    assert unified.gpu_budget_mib == 21845


def test_detect_apple_unreadable_memsize_raises(tmp_path):
    recording = tmp_path / "bad.txt"
    recording.write_text("hw.memsize: lots\nmachdep.cpu.brand_string: Apple M2\n")
    with pytest.raises(DetectionError, match="hw.memsize"):
        detect_apple(run=replay(recording))


def test_detect_takes_apple_path_only_on_darwin_arm64():
    apple = detect(run=replay(SYSCTL / "apple-m2-16gb.txt"), system=darwin(8, 16384, 9000))
    assert apple.is_apple and apple.gpus[0].vendor == "apple"
    intel_mac = SystemInfo(
        os="darwin", arch="x86_64", cpu_cores=4, ram_total_mib=16384, ram_available_mib=9000
    )
    snap = detect(run=replay(None), nvml=NoNvml(), system=intel_mac)
    assert snap.gpus == [] and snap.unified_memory is None


# --- system -------------------------------------------------------------------------------


def test_system_detection_on_this_machine_is_sane():
    info = detect_system()
    assert info.os in {"linux", "darwin", "windows"}
    assert info.arch in {"x86_64", "arm64"}
    assert info.cpu_cores >= 1
    assert info.cpu_threads is not None and info.cpu_threads >= info.cpu_cores
    assert 0 < info.ram_available_mib <= info.ram_total_mib


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("AMD64", "x86_64"), ("x86_64", "x86_64"), ("aarch64", "arm64"), ("arm64", "arm64")],
)
def test_normalise_arch(raw, expected):
    assert normalise_arch(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"), [("linux", "linux"), ("darwin", "darwin"), ("win32", "windows")]
)
def test_normalise_os(raw, expected):
    assert normalise_os(raw) == expected


# --- snapshot files -----------------------------------------------------------------------


def test_every_listed_machine_file_exists():
    assert {p.stem for p in MACHINES.glob("*.json")} == set(MACHINE_SPECS)


@pytest.mark.parametrize("name", sorted(MACHINE_SPECS))
def test_machine_file_is_what_detect_prints(name):
    path = MACHINES / f"{name}.json"
    assert load_snapshot(path) == build_machine(name)
    assert json.loads(path.read_text()) == build_machine(name).model_dump(mode="json")


def test_a6000_machine_matches_design_example():
    snap = load_snapshot(MACHINES / "a6000-48gb.json")
    (gpu,) = snap.gpus
    assert (gpu.memory_total_mib, gpu.memory_free_mib) == (49140, 48335)
    assert snap.system.ram_total_mib == 128000


def test_load_snapshot_missing_file(tmp_path):
    with pytest.raises(HardwareSnapshotError, match="does not exist") as info:
        load_snapshot(tmp_path / "nope.json")
    assert "\n" not in str(info.value)


def test_load_snapshot_invalid_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(HardwareSnapshotError, match="not valid JSON") as info:
        load_snapshot(path)
    assert "\n" not in str(info.value)


def test_load_snapshot_wrong_schema(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"gpus": [], "system": {"os": "linux"}}))
    with pytest.raises(HardwareSnapshotError, match="system.arch") as info:
        load_snapshot(path)
    assert "\n" not in str(info.value)
