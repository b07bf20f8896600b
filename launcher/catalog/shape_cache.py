"""A GGUF file's planning facts (its `ModelShape`), kept in the llmup home between starts.

Reading a header parses the whole vocabulary: Gemma 3's 262k tokens take ~0.3 s on a fast
core, paid by every `llmup serve --model-file` before its backend could start. The facts
depend only on the file's bytes, so they are kept per file under `cache/gguf-shapes.json`,
keyed by each shard's resolved path, size, inode and modification time (a rewritten or
replaced file reads again). The entry is a JSON copy of what the header said, checked by
the same types on the way back in; an unreadable cache is read past, never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from launcher.catalog.gguf_file import read_model_file, shard_paths
from launcher.catalog.models import Architecture
from launcher.catalog.shape import ModelShape, WeightLayout
from launcher.jsonfile import read_json, write_json_atomic

log = logging.getLogger(__name__)

CACHE_FILE = Path("cache") / "gguf-shapes.json"
FORMAT = 1
MAX_ENTRIES = 32  # files remembered; the entry written longest ago goes first


def file_key(path: Path) -> str:
    """What identifies the bytes of a (possibly split) GGUF file without reading them."""
    parts = []
    for shard in shard_paths(path):
        st = shard.stat()
        parts.append(f"{shard.resolve()}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


def shape_to_json(shape: ModelShape) -> dict[str, Any]:
    data = asdict(shape)
    data["arch"] = shape.arch.model_dump()
    return data


def shape_from_json(data: dict[str, Any]) -> ModelShape:
    """The shape back from its JSON copy; a wrong field raises (TypeError, ValueError)."""
    layout = dict(data["layout"])
    layout["layers"] = tuple(layout["layers"])
    return ModelShape(
        **{
            **data,
            "arch": Architecture.model_validate(data["arch"]),
            "layout": WeightLayout(**layout),
            "swa_layers": tuple(data.get("swa_layers", ())),
        }
    )


def model_file_shape(path: str | Path, *, home: Path | None) -> ModelShape:
    """`read_model_file(path)`, from the home's cache when this very file was read before
    (`home` None: always read)."""
    path = Path(path)
    if home is None or not path.is_file():
        return read_model_file(path)
    cache_path = Path(home) / CACHE_FILE
    key = file_key(path)
    entries = _entries(cache_path)
    if key in entries:
        try:
            return shape_from_json(entries[key]["shape"])
        except (TypeError, ValueError, KeyError) as exc:
            log.warning("ignoring a malformed cached header of %s: %s", path, exc)
    shape = read_model_file(path)
    entries[key] = {"at": time.time(), "shape": shape_to_json(shape)}
    while len(entries) > MAX_ENTRIES:
        entries.pop(min(entries, key=lambda k: _written_at(entries[k])))
    try:
        write_json_atomic(cache_path, {"format": FORMAT, "shapes": entries})
    except OSError as exc:  # a cache is never worth failing a plan
        log.warning("could not cache the header of %s: %s", path, exc)
    return shape


def _written_at(entry: Any) -> float:
    at = entry.get("at") if isinstance(entry, dict) else None
    return at if isinstance(at, (int, float)) else 0.0


def _entries(cache_path: Path) -> dict[str, Any]:
    data = read_json(cache_path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return {}
    shapes = data.get("shapes")
    return dict(shapes) if isinstance(shapes, dict) else {}
