"""The session-slot worker's HTTP app over a loaded model and context: the shared worker
routes (`workers.api`) over the `BatchEngine`, the slot routes (`GET /slots`, `DELETE
/slots`), and llama.cpp's sampling extras of a request (`grammar`, `top_k`, `min_p`,
`repeat_penalty`, `logit_bias`; `response_format` json_object / json_schema as a grammar).

Apart from `server` (the command line and the load) so that the worker imports this, and
FastAPI with it, while llama.cpp loads the model on another thread.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from launcher.errors import BadRequestError
from launcher.workers.api import create_worker_app
from launcher.workers.llamacpp_slots.engine import BatchEngine
from launcher.workers.llamacpp_slots.native import NativeContext, NativeModel
from launcher.workers.llamacpp_slots.sampling import GrammarError, check_grammar, json_mode_grammar
from launcher.workers.llamacpp_slots.slot_store import (
    KEY_FILE,
    DiskStore,
    RamStore,
    SlotStore,
    state_key,
)
from launcher.workers.llamacpp_slots.slots import SlotManager
from launcher.workers.llamacpp_slots.text import LlamaText
from launcher.workers.prepare import WorkerState, session_key

if TYPE_CHECKING:
    from launcher.workers.llamacpp_slots.server import SlotOptions

logger = logging.getLogger(__name__)


# ---- llama.cpp's sampling extras ----------------------------------------------------------


class _Extras(BaseModel):
    """The request fields beyond OpenAI's that llama.cpp's servers accept (and this one
    implements)."""

    model_config = ConfigDict(extra="ignore")
    grammar: str | None = None
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, ge=0.0, le=100.0)


# what llama_cpp.server does and this worker does not (the proxy refuses them before)
NOT_HERE = (
    "tools", "tool_choice", "functions", "function_call", "mirostat_mode", "mirostat_tau",
    "mirostat_eta", "min_tokens",
)  # fmt: skip


def sampling_extras(model: NativeModel, body: Any) -> dict[str, Any]:
    """`GenerationParams` fields from a request's extras; bad ones are a 400 up front."""
    extra = body.model_extra or {}
    for name in NOT_HERE:
        if getattr(body, name, None) is not None or extra.get(name) is not None:
            raise BadRequestError(f"`{name}` is not supported by this worker", param=name)
    try:
        extras = _Extras.model_validate(extra)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise BadRequestError(f"{param}: {first['msg']}", param=param) from None
    return {
        "grammar": _grammar(model, extras.grammar, getattr(body, "response_format", None)),
        "top_k": extras.top_k,
        "min_p": extras.min_p,
        "repeat_penalty": extras.repeat_penalty,
        "logit_bias": _logit_bias(model, body.logit_bias),
    }


def _logit_bias(model: NativeModel, given: dict[str, float] | None) -> dict[int, float]:
    bias = {int(token): value for token, value in (given or {}).items()}
    if any(not 0 <= token < model.vocab_size for token in bias):
        raise BadRequestError(
            f"logit_bias token ids must be in [0, {model.vocab_size})", param="logit_bias"
        )
    return bias


def _grammar(model: NativeModel, grammar: str | None, response_format: Any) -> str | None:
    """The request's grammar, or JSON mode's; one llama.cpp cannot parse is a 400."""
    if grammar is None and response_format is not None:
        try:
            grammar = json_mode_grammar(response_format.type, response_format.json_schema_)
        except GrammarError as exc:
            raise BadRequestError(str(exc), param="response_format") from None
    if grammar is not None and not check_grammar(model, grammar):
        raise BadRequestError("the grammar does not parse as llama.cpp GBNF", param="grammar")
    return grammar


# ---- the slot routes ----------------------------------------------------------------------


@dataclass
class Slots:
    engine: BatchEngine
    manager: SlotManager
    store: SlotStore

    def snapshot(self) -> dict[str, Any]:
        """Slot figures for the proxy's /metrics (taken on the engine thread)."""
        manager, store, stats = self.manager, self.store, self.manager.stats
        disk = store.disk
        return {
            "slots": len(manager.slots),
            "in_use": manager.in_use(),
            "pinned": manager.pinned(),
            "ram_bytes": store.ram.bytes_held,
            "ram_states": len(store.ram),
            "disk_bytes": disk.bytes_held if disk else 0,
            "disk_states": len(disk) if disk else 0,
            "restores": dict(stats.restores),
            "saves": stats.saves,
            "prefix_tokens_reused": stats.reused_tokens,
            "prompt_tokens_evaluated": stats.evaluated_tokens,
            "generated_tokens": self.engine.stats.generated_tokens,
        }


slot_router = APIRouter()


def _slots(request: Request) -> Slots:
    return request.app.state.slots


@slot_router.get("/slots")
async def slot_stats(request: Request) -> dict[str, Any]:
    slots = _slots(request)
    return await asyncio.wrap_future(slots.engine.call(slots.snapshot))


@slot_router.delete("/slots")
async def forget_session(request: Request) -> dict[str, Any]:
    """Forget one session (named by the private headers): sequence, RAM and disk."""
    key = session_key(request)
    if key is None:
        raise BadRequestError("name the session with the proxy's private session headers")
    slots = _slots(request)
    held = await asyncio.wrap_future(slots.engine.call(lambda: slots.manager.forget(key)))
    return {"deleted": bool(held)}


# ---- assembling a worker ------------------------------------------------------------------


def create_app(
    model: NativeModel,
    ctx: NativeContext,
    identity: dict[str, Any],
    slots: SlotOptions,
    *,
    model_alias: str,
    build: dict[str, Any] | None = None,
    planned_seqs: int | None = None,
) -> FastAPI:
    """The worker's app over a loaded model and context; all state on `app.state`.
    `identity` is what a saved state must match; `build` what the fingerprint covers;
    `planned_seqs` the sequences the context grows to (`BatchEngine.grow_later`)."""
    disk = None
    if slots.folder is not None:
        try:
            slots.folder.mkdir(parents=True, exist_ok=True)
            key = state_key(slots.folder / KEY_FILE)
            disk = DiskStore(
                slots.folder, identity, key=key, budget=slots.disk_bytes, ttl_s=slots.ttl_s
            )
        except OSError as exc:  # serving beats persisting: RAM only, and say so
            logger.warning("saved sessions stay in RAM only: %s", exc)
    store = SlotStore(RamStore(slots.ram_bytes), disk, ttl_s=slots.ttl_s)
    manager = SlotManager(ctx, store, n_swa=model.n_swa, planned_seqs=planned_seqs)
    engine = BatchEngine(model, ctx, manager)
    text = LlamaText(model)
    state = WorkerState(
        tokenizer=text,
        engine=engine,
        chat_prompt=text.chat_prompt,
        model_alias=model_alias,
        max_seq_len=ctx.n_ctx_seq,
        sampling_extras=lambda body: sampling_extras(model, body),
        identity=build or identity,
    )
    app = create_worker_app(state, title="llmup llama.cpp worker", routers=(slot_router,))
    app.state.slots = Slots(engine, manager, store)
    return app
