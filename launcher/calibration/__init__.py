"""After a load: what the backend measured, compared with what the plan predicted.

`llamacpp_log` reads llama.cpp's load log, `records` keeps predicted and measured buffers per
model on this machine (what `llmup plan` shows), `speedcheck` times decode and prompt once
per plan, and `oom_fallback` picks the candidate to try after an out-of-memory load.
"""
