"""llmup's GGUF worker: one llama.cpp context whose KV cache holds `parallel` sessions,
decoded together, each kept across requests (`python -m launcher.workers.llamacpp_slots.server`)."""
