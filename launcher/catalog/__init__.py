"""The models llmup can serve and their downloadable variants. Entry point: `load_catalog()`."""

from launcher.catalog.loader import Catalog, load_catalog

__all__ = ["Catalog", "load_catalog"]
