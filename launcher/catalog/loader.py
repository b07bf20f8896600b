"""Load the catalog data files shipped inside the package."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

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
def load_catalog() -> Catalog:
    """Every `*.json` in catalog/data, merged; a malformed file is a CatalogError."""
    models: list[ModelSpec] = []
    quants: dict[str, GgufQuant] = {}
    folder = resources.files("launcher.catalog") / "data"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            data = CatalogFile.model_validate_json(entry.read_text())
        except ValidationError as exc:
            raise CatalogError(f"catalog file {entry.name} is malformed: {exc}") from None
        models.extend(data.models)
        quants.update(data.gguf_quants)
    return Catalog(models=tuple(models), gguf_quants=quants)
