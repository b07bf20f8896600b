"""A Responses API chain against the same conversation resent through chat: TTFT per turn.

Run:  python benchmarks/responses_chain.py [--quick] [--turns 10] [--words 60] [--out FILE]

One `llmup serve` (the session-slot worker) on Gemma 3 270M (the PyPI package's GGUF; a
generated tiny Llama with --quick). Two arms, one after the other, each its own words:

1. chain: `POST /v1/responses` with `previous_response_id` (the first without), streamed:
   each turn continues the session that holds the chain's KV cache, so only the new user
   message is evaluated.
2. resend: `POST /v1/chat/completions` without a session, streamed, carrying the whole
   conversation so far (the replies of its own earlier turns), as a client of a stateless
   server sends it.

Each turn adds a user message of `--words` words (60) and asks for 24 tokens at
temperature 0. Time to first token is to the first text delta (or, for a reply that is
empty, to its end: the prompt's evaluation is what it measures either way). Also recorded
per turn: the prompt's tokens and how many of them the server took from a KV cache
(`cached_tokens`). Target: the chain's last turn answers first faster than the resent
conversation's last turn.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
from benchlib import Run, bench_model, llmup_serving, parser, print_table, served_model, target

TEXT = (
    "the river bends past an old mill where children count boats and a baker sells bread "
    "before dawn while the town clock strikes seven and a cat watches sparrows in the square "
    "people talk about rain harvest music trains letters gardens mountains winter lanterns"
)
WORDS = TEXT.split()
OPENING = "Continue the story: Once upon a time, in a small town by the river,"
MAX_TOKENS = 24


def user_message(arm: str, turn: int, words: int) -> str:
    rng = random.Random(f"{arm}-{turn}")
    return f"Turn {turn}: {' '.join(rng.choice(WORDS) for _ in range(words))}. {OPENING}"


def events(reply: httpx.Response) -> Any:
    for line in reply.iter_lines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            yield json.loads(line[5:])


def response_turn(http: httpx.Client, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(TTFT, the completed response) of one streamed response."""
    started, first = time.perf_counter(), None
    with http.stream("POST", "/v1/responses", json=body) as reply:
        reply.raise_for_status()
        for event in events(reply):
            if event["type"] == "response.output_text.delta" and first is None:
                first = time.perf_counter() - started
            if event["type"] in ("response.completed", "response.failed"):
                final = event["response"]
    if final["status"] == "failed":
        raise SystemExit(f"a response failed: {final['error']}")
    return (first if first is not None else time.perf_counter() - started), final


def chat_turn(http: httpx.Client, body: dict[str, Any]) -> tuple[float, str, dict[str, Any]]:
    """(TTFT, reply text, usage) of one streamed chat request."""
    started, first, parts, usage = time.perf_counter(), None, [], {}
    with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        for chunk in events(reply):
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    first = first if first is not None else time.perf_counter() - started
                    parts.append(text)
    return (first if first is not None else time.perf_counter() - started), "".join(parts), usage


def chain(http: httpx.Client, model: str, turns: int, words: int) -> list[dict[str, Any]]:
    rows, previous = [], None
    for turn in range(1, turns + 1):
        body = {"model": model, "input": user_message("chain", turn, words), "stream": True,
                "max_output_tokens": MAX_TOKENS, "temperature": 0,
                **({"previous_response_id": previous} if previous else {})}  # fmt: skip
        ttft, final = response_turn(http, body)
        previous = final["id"]
        usage = final["usage"]
        rows.append({"ttft_s": round(ttft, 4), "prompt_tokens": usage["input_tokens"],
                     "cached_tokens": usage["input_tokens_details"]["cached_tokens"]})  # fmt: skip
    return rows


def resend(http: httpx.Client, model: str, turns: int, words: int) -> list[dict[str, Any]]:
    rows, messages = [], []
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": user_message("resend", turn, words)})
        body = {"model": model, "messages": messages, "stream": True, "temperature": 0,
                "max_tokens": MAX_TOKENS, "stream_options": {"include_usage": True}}  # fmt: skip
        ttft, text, usage = chat_turn(http, body)
        messages.append({"role": "assistant", "content": text})
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        rows.append({"ttft_s": round(ttft, 4), "prompt_tokens": usage.get("prompt_tokens"),
                     "cached_tokens": cached})  # fmt: skip
    return rows


def main() -> None:
    args = parser(__doc__, "responses_chain")
    args.add_argument("--turns", type=int, default=10, help="turns per arm (3 with --quick)")
    args.add_argument("--words", type=int, default=60, help="words per user message (20 --quick)")
    args = args.parse_args()
    run = Run("responses_chain", args.quick)
    model_path, model_name = bench_model(args.quick)
    turns, words = (3, 20) if args.quick else (args.turns, args.words)
    with llmup_serving(Path(model_path)) as (_, url):
        model = served_model(url + "/v1")
        with httpx.Client(base_url=url, timeout=600, trust_env=False) as http:
            arms = {"chain": chain(http, model, turns, words),
                    "resend": resend(http, model, turns, words)}  # fmt: skip
    print_table(
        "Responses chain vs chat resend: time to first token (s) per turn",
        ("turn", "chain TTFT", "chain prompt / cached", "resend TTFT", "resend prompt / cached"),
        [
            (str(i), a["ttft_s"], f"{a['prompt_tokens']} / {a['cached_tokens']}", b["ttft_s"],
             f"{b['prompt_tokens']} / {b['cached_tokens']}")
            for i, (a, b) in enumerate(zip(arms["chain"], arms["resend"]), 1)
        ],
    )  # fmt: skip
    last_chain, last_resend = arms["chain"][-1]["ttft_s"], arms["resend"][-1]["ttft_s"]
    targets = [target(f"turn {turns} TTFT, chain (s) below resend", last_chain, last_resend,
                      "below", "s")]  # fmt: skip
    conditions = {"model": model_name, "turns": turns, "words_per_message": words,
                  "max_tokens": MAX_TOKENS}  # fmt: skip
    run.write(args.out, {"conditions": conditions, "arms": arms}, targets)


if __name__ == "__main__":
    main()
