"""Stage 1: what this machine has. Entry point: `detect()`; `load_snapshot()` reads one back."""

from launcher.hardware.detect import detect
from launcher.hardware.snapshot import HardwareSnapshot, load_snapshot

__all__ = ["HardwareSnapshot", "detect", "load_snapshot"]
