"""Tool turns in a session: sending `tools` with every request keeps the KV cache reuse.

Run:  python benchmarks/tool_turns.py [--quick] [--out benchmarks/results/tool_turns.json]

`llmup serve --model-file M` (llmup's session-slot worker, Gemma 3 270M; --quick: a
generated tiny model) serves two sessions interleaved turn by turn with the same user
messages; one sends a `tools` list with every request (tool_choice auto, as agent frameworks
do), the other none. Each turn is streamed and its time to first token taken, with the
prompt tokens and how many of them the worker did not evaluate again (`cached_tokens`).
Then a third session makes tool round trips: a forced call (tool_choice required), then the
tool's result as the next turn, whose prompt holds the call as the model wrote it.

Targets (issue 21): a continued turn with tools takes at most 1.2x the time to first token
of the same turn without (the median of turns 2 on, each turn's two figures taken back to
back); a result turn reuses at least the whole prompt of the call turn before it. The
load average before and after is recorded: the machine may be shared, rerun when it was
busy.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from benchlib import Run, parser, print_table, target
from session_servers import Arm, start_llmup
from session_turns import bench_model, no_end_bias, user_message

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search_notes",
            "description": "Search the user's notes for a phrase and return the matching lines",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "maxLength": 40},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 20},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in a time zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 32}},
                "required": ["zone"],
            },
        },
    },
]


def shape(quick: bool) -> dict[str, int]:
    if quick:
        return {"context": 2048, "turns": 3, "words": 12, "reply": 8, "rounds": 2}
    return {"context": 2048, "turns": 8, "words": 95, "reply": 24, "rounds": 3}


def stream(arm: Arm, session: str, messages: list[dict], **fields: Any) -> dict[str, Any]:
    """One streamed turn: time to its first delta (text or call), its usage, its message."""
    body = {"model": arm.model, "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0, **fields}  # fmt: skip
    headers = {"X-Session-Id": session}
    started, first, usage, text, calls = time.perf_counter(), None, {}, "", {}
    with httpx.stream("POST", arm.url + "/v1/chat/completions", json=body, headers=headers,
                      timeout=600) as reply:  # fmt: skip
        if reply.status_code != 200:
            raise SystemExit(f"HTTP {reply.status_code}: {reply.read().decode()[:500]}")
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("tool_calls"):
                    first = first or time.perf_counter() - started
                text += delta.get("content") or ""
                for call in delta.get("tool_calls") or []:
                    calls.setdefault(call["index"], call)
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft": first or time.perf_counter() - started, "text": text,
            "calls": [calls[i] for i in sorted(calls)],
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "cached_tokens": details.get("cached_tokens", 0)}  # fmt: skip


def chat_turns(arm: Arm, s: dict[str, int], bias: dict) -> list[dict[str, Any]]:
    """Both sessions, turn by turn: the same message, with and without `tools` (which goes
    first alternates, so neither always runs on a machine the other just warmed)."""
    rows = []
    sides = [("plain", {}), ("tools", {"tools": TOOLS})]
    for turn in range(1, s["turns"] + 1):
        row: dict[str, Any] = {"turn": turn}
        message = {"role": "user", "content": user_message(0, turn, s["words"], "tools")}
        for name, extra in sides if turn % 2 else sides[::-1]:
            got = stream(arm, name, [message], max_tokens=s["reply"], logit_bias=bias, **extra)
            row[name] = {k: got[k] for k in ("ttft", "prompt_tokens", "cached_tokens")}
        rows.append(row)
    return rows


def round_trips(arm: Arm, s: dict[str, int], bias: dict) -> list[dict[str, Any]]:
    """A forced call, then its result: how much of the result turn's prompt was reused."""
    rows = []
    for turn in range(1, s["rounds"] + 1):
        ask = {"role": "user", "content": user_message(1, turn, s["words"], "round")}
        call = stream(arm, "rounds", [ask], tools=TOOLS, tool_choice="required",
                      parallel_tool_calls=False, max_tokens=120, logit_bias=bias)  # fmt: skip
        if not call["calls"]:
            raise SystemExit("the forced call turn returned no call")
        result = {"role": "tool", "tool_call_id": call["calls"][0]["id"],
                  "content": "3 notes: the mill, the bakery, the clock tower"}  # fmt: skip
        answer = stream(arm, "rounds", [result], tools=TOOLS, max_tokens=s["reply"],
                        logit_bias=bias)  # fmt: skip
        rows.append({"round": turn, "call_ttft": call["ttft"], "result_ttft": answer["ttft"],
                     "call_prompt_tokens": call["prompt_tokens"],
                     "call_tokens": call["completion_tokens"],
                     "result_prompt_tokens": answer["prompt_tokens"],
                     "result_cached_tokens": answer["cached_tokens"]})  # fmt: skip
    return rows


def run(quick: bool, folder: Path) -> dict[str, Any]:
    s = shape(quick)
    model = bench_model(quick, folder)
    bias = no_end_bias(model, quick)
    arm = start_llmup(model, context=s["context"], impl="slots", parallel=2)
    try:
        turns = chat_turns(arm, s, bias)
        rounds = round_trips(arm, s, bias)
    finally:
        arm.stop()
    return {"conditions": {"model": model.name, "shape": s}, "turns": turns, "rounds": rounds}


def targets(report: dict[str, Any]) -> list[dict]:
    """The median over continued turns of each turn's ratio (one slow turn on a shared
    machine moves a mean of eight, not a median), and the least reuse of a result turn."""
    ratio = statistics.median(r["tools"]["ttft"] / r["plain"]["ttft"] for r in report["turns"][1:])
    reuse = min(r["result_cached_tokens"] / r["call_prompt_tokens"] for r in report["rounds"])
    return [
        target("continued_turn_ttft_tools_vs_plain", ratio, 1.2, "at most"),
        target("result_turn_reuses_the_call_prompt", reuse, 1.0, "at least"),
    ]


def turn_rows(report: dict[str, Any]) -> list[tuple]:
    """The turns table (this script's and the benchmarks page's)."""
    return [
        (r["turn"], f"{r['plain']['ttft']:.3f}", f"{r['tools']['ttft']:.3f}",
         f"{r['plain']['prompt_tokens']} / {r['tools']['prompt_tokens']}",
         f"{r['plain']['cached_tokens']} / {r['tools']['cached_tokens']}")
        for r in report["turns"]
    ]  # fmt: skip


def round_rows(report: dict[str, Any]) -> list[tuple]:
    return [
        (r["round"], f"{r['call_ttft']:.3f}", f"{r['result_ttft']:.3f}", r["call_prompt_tokens"],
         r["call_tokens"], r["result_prompt_tokens"], r["result_cached_tokens"])
        for r in report["rounds"]
    ]  # fmt: skip


TURN_COLUMNS = ("turn", "TTFT without tools", "TTFT with tools", "prompt tokens (without / with)",
                "cached tokens (without / with)")  # fmt: skip
ROUND_COLUMNS = ("round trip", "call TTFT", "result TTFT", "call prompt tokens",
                 "call tokens", "result prompt tokens", "result cached tokens")  # fmt: skip


def render(report: dict[str, Any]) -> None:
    print_table("Session turns with and without tools", TURN_COLUMNS, turn_rows(report))
    print_table("Tool round trips (a forced call, then its result)", ROUND_COLUMNS,
                round_rows(report))  # fmt: skip


def main() -> None:
    args = parser(__doc__.splitlines()[0], "tool_turns").parse_args()
    bench = Run("tool_turns", args.quick)
    with tempfile.TemporaryDirectory() as folder:
        report = run(args.quick, Path(folder))
    render(report)
    bench.write(args.out, report, targets(report))


if __name__ == "__main__":
    sys.exit(main())
