"""Load the catalog data files shipped inside the package."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from launcher.catalog.models import CatalogFile, GgufQuant, ModelSpec
from launcher.errors import CatalogError


@dataclass(frozen=True)
class Catalog:
    models: tuple[ModelSpec, ...]
    gguf_quants: dict[str, GgufQuant]

    def get(self, model_id: str) -> ModelSpec:
        for spec in self.models:
            if spec.id == model_id or spec.label.lower() == model_id.lower():
                return spec
        known = ", ".join(s.id for s in self.models)
        raise CatalogError(f"unknown model id {model_id!r}; known models: {known}")

    def quant(self, name: str) -> GgufQuant:
        try:
            return self.gguf_quants[name]
        except KeyError:
            raise CatalogError(f"unknown GGUF quantization {name!r}") from None


@cache
def load_catalog(folder: Path | None = None) -> Catalog:
    """Every `*.json` in catalog/data (or `folder`), merged; a malformed file is a CatalogError.

    A new model family is one more data file here, not new code.
    """
    models: list[ModelSpec] = []
    quants: dict[str, GgufQuant] = {}
    root = folder if folder is not None else resources.files("launcher.catalog") / "data"
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            data = CatalogFile.model_validate_json(entry.read_text())
        except ValidationError as exc:
            raise CatalogError(f"catalog file {entry.name} is malformed: {exc}") from None
        models.extend(data.models)
        quants.update(data.gguf_quants)
    return Catalog(models=tuple(models), gguf_quants=quants)
