"""The session-slot worker's HTTP app over a loaded model and context: the shared worker
routes (`workers.api`) over the `BatchEngine`, the slot routes (`GET /slots`, `DELETE
/slots`), and llama.cpp's sampling extras of a request (grammars from tools and
`response_format`, `top_k`, `min_p`, `repeat_penalty`, `logit_bias`...).

Apart from `server` (the command line and the load) so that the worker imports this, and
FastAPI with it, while llama.cpp loads the model on another thread.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request

from launcher.errors import BadRequestError
from launcher.json_grammar import ReplyGrammar, reply_grammar
from launcher.reply_format import ReplyFormatError, grammar_spec
from launcher.workers.api import create_worker_app
from launcher.workers.llamacpp_slots.engine import BatchEngine
from launcher.workers.llamacpp_slots.native import NativeContext, NativeModel
from launcher.workers.llamacpp_slots.sampling import check_grammar
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
from launcher.workers.prepare import sampling_extras as checked_extras

if TYPE_CHECKING:
    from launcher.workers.llamacpp_slots.server import SlotOptions

logger = logging.getLogger(__name__)


# ---- llama.cpp's sampling extras ----------------------------------------------------------


def sampling_extras(model: NativeModel, body: Any) -> dict[str, Any]:
    """`GenerationParams` fields from a request's extras; bad ones are a 400 up front."""
    extras = checked_extras(body)
    grammar = _grammar(model, extras.grammar, body)
    return {
        **extras.params(),
        "grammar": grammar.text if grammar else None,
        "grammar_triggers": grammar.triggers if grammar else (),
        "logit_bias": _logit_bias(model, body.logit_bias),
    }


def _logit_bias(model: NativeModel, given: dict[str, float] | None) -> dict[int, float]:
    bias = {int(token): value for token, value in (given or {}).items()}
    if any(not 0 <= token < model.vocab_size for token in bias):
        raise BadRequestError(
            f"logit_bias token ids must be in [0, {model.vocab_size})", param="logit_bias"
        )
    return bias


def _grammar(model: NativeModel, grammar: str | None, body: Any) -> ReplyGrammar | None:
    """The request's own grammar, or the one its tools and JSON reply make
    (`launcher.json_grammar`); one llama.cpp cannot parse, or a schema it cannot convert, is
    a 400."""
    try:
        spec = grammar_spec(body)
        built = reply_grammar(spec) if spec is not None else None
    except ReplyFormatError as exc:
        raise BadRequestError(str(exc), param=exc.param, code="invalid_schema") from None
    if grammar is not None and built is not None:
        raise BadRequestError(
            "`grammar` cannot be combined with tool calls or a JSON response_format",
            param="grammar",
        )
    if grammar is not None:
        built = ReplyGrammar(grammar)
    if built is not None and not check_grammar(model, built.text):
        raise BadRequestError("the grammar does not parse as llama.cpp GBNF", param="grammar")
    return built


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
    `identity` is what a saved state must match; `build` what the fingerprint covers."""
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
        native_tools=text.knows_tools,
        max_choices=ctx.n_seq,
        choices_limit=" (the sequences it decodes at once: `llmup serve --parallel N`)",
        logprobs=True,
        grammar=True,
    )
    app = create_worker_app(state, title="llmup llama.cpp worker", routers=(slot_router,))
    app.state.slots = Slots(engine, manager, store)
    return app
