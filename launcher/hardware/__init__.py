"""Stage 1: what this machine has. Entry point: `detect()`; `load_snapshot()` reads one back.

The names are resolved on first use: reading a snapshot (`launcher.hardware.snapshot`)
should not import every detector (NVML, sysctl, the CPU probe) with it.
"""

from launcher.lazy import lazy_names

__all__ = ["HardwareSnapshot", "detect", "load_snapshot"]
__getattr__ = lazy_names(
    __name__,
    {
        "detect": "launcher.hardware.detect",
        "HardwareSnapshot": "launcher.hardware.snapshot",
        "load_snapshot": "launcher.hardware.snapshot",
    },
)
