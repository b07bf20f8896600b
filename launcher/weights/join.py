"""Concatenate raw byte halves (`*.gguf-split-a`, `-split-b`) into the one `.gguf` llama.cpp loads.

These are not llama.cpp `gguf-split` shards: the hub's 50 GB file limit made TheBloke cut the
70B Q6_K / Q8_0 files in two. The joined copy is written to a temporary file in the same
folder as the hub's blobs (same filesystem) and renamed into place only once it verifies,
so an interrupted join never leaves a half file where a backend would load it.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from launcher.errors import JoinError
from launcher.weights.verify import has_gguf_magic

log = logging.getLogger(__name__)

_BUFFER = 16 * 1024 * 1024


def join_parts(parts: Sequence[Path], output: Path, *, tmp_dir: Path, progress: bool) -> Path:
    """Write `output` = parts[0] + parts[1] + ...; verify size and GGUF magic; return it."""
    expected = sum(p.stat().st_size for p in parts)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{output.name}.{uuid.uuid4().hex[:8]}.joining"
    try:
        _concatenate(parts, tmp, expected, progress and output.name)
        _check_joined(tmp, expected, output.name)
        output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("joined %d parts into %s (%d bytes)", len(parts), output, expected)
    return output


def _concatenate(parts: Sequence[Path], dest: Path, total: int, label: str | bool) -> None:
    with dest.open("wb") as out, _bar(total, label) as bar:
        for part in parts:
            with part.open("rb") as src:
                while chunk := src.read(_BUFFER):
                    out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())


def _bar(total: int, label: str | bool):
    """A tqdm bar like the download bars (the hub's class, so its switches apply), or none."""
    if not label:
        return nullcontext(None)
    from huggingface_hub.utils.tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"joining {label}", disable=None)


def _check_joined(path: Path, expected: int, name: str) -> None:
    size = path.stat().st_size
    if size != expected:
        raise JoinError(
            f"joining {name} produced {size} bytes, expected {expected}; "
            "the halves are kept, run `llmup pull` again"
        )
    if not has_gguf_magic(path):
        raise JoinError(
            f"joined {name} does not start with the GGUF magic; the halves are kept. "
            "Check that the plan lists split-a before split-b"
        )
