"""llama-cpp-python's OpenAI server, with what llmup needs around it.

Run as `python -m launcher.workers.llamacpp_python.server [--repack auto|on|off] <llama_cpp.server
args>`. The app and every flag are llama_cpp.server's own (its `create_app`, its settings
parser); the worker adds:

- `GET /health`, answered by the event loop without the model's lock. llama_cpp.server's
  routes all wait for that lock, so during a long generation they cannot tell "busy" from
  "hung"; /health can: it fails only when the process stops answering (stopped, wedged).
- the per-run backend key (`backend_key`): no request reaches the app without it.
- `launcher.workers.llamacpp_python.patches`: exact usage in streams, a grammar llama.cpp refuses
  answered as an error instead of a crash, `GET /llmup/meta`.
- a bounded graceful shutdown: on SIGTERM, streams in flight get 2 s, not for ever.
- weight repacking as a switch. llama.cpp copies CPU-resident weights into "extra buffer
  types" (CPU_REPACK, AMX) for faster matmuls. On CPUs with AMX, this llama.cpp build crashes
  on the first token of a quantized model in ggml_backend_amx_mul_mat (llama.cpp issue
  #20824; reproduced here with Q4_0, Q8_0 and Q4_K_M models), so `auto` turns repacking off
  on AMX CPUs and keeps it elsewhere.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from launcher.workers.backend_key import require_backend_key
from launcher.workers.repack import cpu_has_amx, repack_enabled

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 2


def disable_weight_repack() -> None:
    """Make every model load with use_extra_bufts = False (llama_cpp.Llama has no option)."""
    import llama_cpp.llama_cpp as lib

    defaults = lib.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_extra_buffers


def build_app(argv: list[str]) -> tuple[Any, str, int]:
    """llama_cpp.server's app for its own flags (the model loads here), with /health added;
    also the host and port it should listen on."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings

    parser = argparse.ArgumentParser(prog="python -m launcher.workers.llamacpp_python.server")
    add_args_from_model(parser, Settings)
    args = parser.parse_args(argv)
    server = parse_model_from_args(ServerSettings, args)
    app = create_app(
        server_settings=server, model_settings=[parse_model_from_args(ModelSettings, args)]
    )
    app.add_api_route("/health", health, methods=["GET"])
    return app, server.host, server.port


async def health() -> dict[str, str]:
    """The process answers; the model may be busy with a generation (that is not sickness)."""
    return {"status": "ok"}


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--repack", choices=("auto", "on", "off"), default="auto")
    ours, rest = parser.parse_known_args(argv if argv is not None else sys.argv[1:])
    if not repack_enabled(ours.repack, amx=cpu_has_amx()):
        disable_weight_repack()
        print("llmup worker: weight repacking off (AMX CPU or --repack off)", file=sys.stderr)
    from launcher.workers.llamacpp_python import patches

    patches.apply()  # before build_app imports create_app
    app, host, port = build_app(rest)
    uvicorn.run(
        require_backend_key(app),
        host=host,
        port=port,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )


if __name__ == "__main__":
    main()
