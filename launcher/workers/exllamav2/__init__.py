"""llmup's GPTQ worker on exllamav2 (`python -m launcher.workers.exllamav2.server`); exllamav2
and torch are imported only inside it, never at module level of another package."""
