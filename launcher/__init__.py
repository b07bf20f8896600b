"""llmup: serve the largest Llama-2 a machine can hold behind an OpenAI-compatible API."""

__version__ = "0.1.0"
