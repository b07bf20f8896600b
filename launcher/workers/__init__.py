"""The child processes behind the proxy, one package each, started as `python -m`:

- `llamacpp_slots`: llmup's own GGUF worker (session slots over llama.cpp's C API);
- `llamacpp_python`: llama-cpp-python's OpenAI server with llmup's additions;
- `exllamav2`: llmup's GPTQ worker.

The modules beside them are what the workers share: the HTTP layer (`api`), a request's
preparation off the event loop (`prepare`), the engine thread's jobs (`generation`), the
per-run key check (`backend_key`) and Meta's Llama-2 chat format (`llama2_chat`). A worker
imports only these and the base modules (`protocol`, `errors`, `api_errors`, `engines`,
`settings`, `private`), never the launcher's side of the process boundary.
"""
