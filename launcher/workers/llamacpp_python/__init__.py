"""llama-cpp-python's OpenAI server with what llmup adds around it
(`python -m launcher.workers.llamacpp_python.server`, `--llamacpp-impl server`)."""
