"""Which GPUs llmup may use: physical indices, CUDA_VISIBLE_DEVICES and --gpus."""

from __future__ import annotations

import logging

import pytest
from support.recorded_machines import recorded

from launcher.errors import UsageError
from launcher.hardware.snapshot import Gpu, HardwareSnapshot
from launcher.hardware.visible import select_gpus


def indices(snap: HardwareSnapshot) -> list[int]:
    return [g.index for g in snap.gpus]


def test_detection_honours_cuda_visible_devices():
    snap = recorded("a6000x2-busy", environ={"CUDA_VISIBLE_DEVICES": "1"})
    assert indices(snap) == [1] and snap.gpus[0].device == "cuda:1"
    assert snap.gpus_selected_by == "CUDA_VISIBLE_DEVICES=1"


def test_a_replayed_machine_ignores_this_shells_environment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert indices(recorded("a6000x2-busy")) == [0, 1]


@pytest.mark.parametrize(("value", "expected"), [("1,0", [1, 0]), ("", []), ("-1", [])])
def test_cuda_visible_devices_order_and_hiding(value, expected):
    snap = recorded("rtx3090-3060-a4000", environ={"CUDA_VISIBLE_DEVICES": value})
    assert indices(snap) == expected


def test_cuda_stops_at_an_unknown_entry(caplog):
    with caplog.at_level(logging.WARNING):
        snap = recorded("rtx3090-3060-a4000", environ={"CUDA_VISIBLE_DEVICES": "2,7,0"})
    assert indices(snap) == [2]
    assert "'7' names no GPU" in caplog.text


def test_gpus_flag_takes_indices_and_uuid_prefixes():
    base = recorded("rtx3090-3060-a4000")
    gpus = [g.model_copy(update={"uuid": f"GPU-{g.index}abc-{g.index}"}) for g in base.gpus]
    snap = base.model_copy(update={"gpus": gpus})
    chosen = select_gpus(snap, gpus="GPU-2abc,0")
    assert indices(chosen) == [2, 0] and chosen.gpus_selected_by == "--gpus GPU-2abc,0"


def test_gpus_flag_wins_over_the_environment():
    snap = recorded("rtx3090-3060-a4000", gpus="1", environ={"CUDA_VISIBLE_DEVICES": "0"})
    assert indices(snap) == [1]


def test_gpus_flag_naming_no_gpu_is_a_clear_error():
    with pytest.raises(UsageError, match=r"--gpus 0,5: no GPU '5' here \(GPUs: 0, 1, 2\)"):
        select_gpus(recorded("rtx3090-3060-a4000"), gpus="0,5")


def test_device_names_are_physical_indices():
    gpu = Gpu(index=3, vendor="nvidia", name="x", memory_total_mib=1, memory_free_mib=1)
    assert gpu.device == "cuda:3"
