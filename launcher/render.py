"""The CLI renderer: the only place llmup writes human-readable output.

It imports no model type at run time (they are annotations only): the CLI imports it on
every start, `llmup --help` included, which should not pay for pydantic's model building.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from launcher.units import mib_gib_text as gib

if TYPE_CHECKING:
    from launcher.hardware.snapshot import HardwareSnapshot
    from launcher.planning.plan import Plan, Rejected

out = Console()
err = Console(stderr=True)


def print_json(value: Any) -> None:
    """A pydantic model (anything with model_dump) or plain data, as indented JSON."""
    data = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def snapshot(snap: HardwareSnapshot) -> None:
    _devices(snap)
    s = snap.system
    if s.memory_bandwidth_gbs:
        out.print(
            f"CPU speed (measured once, cached): {s.memory_bandwidth_gbs:g} GB/s read, "
            f"{s.cpu_gflops or 0:g} GFLOPS",
            highlight=False,
        )
    if snap.gpus_selected_by:
        out.print(f"GPUs narrowed by {snap.gpus_selected_by}", highlight=False)
    if snap.backends is not None:
        installed_backends(snap.backends)


def installed_backends(backends) -> None:
    lc, ex = backends.llama_cpp, backends.exllamav2
    table = Table(title="Installed backends")
    for col in ("backend", "version", "GPU", "detail"):
        table.add_column(col)
    gpu = ", ".join(lc.gpu_backends) or "none (CPU build)"
    detail = lc.error or ("offload works" if lc.gpu_offload else "cannot offload")
    table.add_row("llama-cpp-python", lc.version or "-", gpu, detail + (", RPC" if lc.rpc else ""))
    torch = f"torch {ex.torch}" if ex.torch else "no torch"
    cuda = f"CUDA {ex.torch_cuda}" if ex.torch_cuda else "no CUDA"
    table.add_row(
        "exllamav2", ex.version or ("-" if ex.installed else "not installed"), cuda, torch
    )
    out.print(table)


def _devices(snap: HardwareSnapshot) -> None:
    table = Table(title="Hardware")
    for col in ("device", "name", "total", "free", "compute"):
        table.add_column(col)
    for g in snap.gpus:
        table.add_row(
            g.device,
            g.name,
            gib(g.memory_total_mib),
            gib(g.memory_free_mib),
            g.compute_capability or "-",
        )
    s = snap.system
    table.add_row(
        "cpu",
        f"{s.os}/{s.arch}, {s.cpu_cores} cores",
        gib(s.ram_total_mib),
        gib(s.ram_available_mib),
        "-",
    )
    out.print(table)
    if snap.unified_memory:
        um = snap.unified_memory
        out.print(
            f"unified memory: {gib(um.ram_total_mib)} RAM, Metal budget {gib(um.gpu_budget_mib)}"
        )


OFFLOAD = {
    "full": "every layer on the accelerator",
    "partial": "partial offload",
    "cpu": "CPU only",
}


def plan(p: Plan, *, rejected: int = 8) -> None:
    src = p.source.local_path or f"{p.source.repo_id}@{p.source.revision}"
    out.print(
        f"[bold]{p.model.id}[/bold] {p.quant} ({p.bits_per_weight} bits/weight) "
        f"with {p.backend}, context {p.context}, {OFFLOAD[p.placement.offload]}"
    )
    out.print(f"source: {src} {' + '.join(p.source.files)}")
    if p.backend == "llama.cpp":
        out.print(sessions_line(p), highlight=False)
    table = Table(title="Memory per device (MiB)")
    for col in ("device", "layers", "weights", "kv cache", "compute", "overhead", "need", "budget"):
        table.add_column(col, justify="right")
    for d in p.placement.devices:
        b = d.breakdown_mib
        table.add_row(
            d.device,
            str(d.layers),
            str(b.get("weights", "")),
            str(b.get("kv_cache", "")),
            str(b.get("compute", "")),
            str(b.get("overhead", "")),
            str(d.need_mib),
            str(d.budget_mib),
        )
    table.add_row(
        "RAM", "", "", "", "", "", str(p.placement.ram_need_mib), str(p.placement.ram_budget_mib)
    )
    m = p.memory_mib
    table.add_row(
        "total",
        "",
        str(m.weights),
        str(m.kv_cache),
        str(m.compute),
        str(m.overhead),
        str(m.total),
        "",
    )
    out.print(table)
    _speed(p)
    for left in p.placement.left_out:
        out.print(f"not used: {left.reason}", highlight=False, soft_wrap=True, markup=False)
    for line in p.notes:
        out.print(f"[yellow]note:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
    measured = getattr(p, "measured", None)
    if measured:
        calibration(measured)
    misses = [r for r in p.rejected if not r.reason.startswith("fits")]
    if misses:
        rejections(misses[:rejected], title="Closest candidates that do not fit")


def sessions_line(p: Plan) -> str:
    if p.settings.llamacpp_impl == "server":
        return "worker: llama-cpp-python's server, one request at a time"
    return (
        f"worker: llmup's session slots, {p.parallel} sequence(s) of {p.context} tokens "
        f"decoded together; saved sessions: up to {p.settings.slot_ram_mib} MiB in RAM, "
        "then on disk"
    )


def calibration(measured: dict) -> None:
    """A model already run here: the plan's figures beside what llama.cpp reported."""
    table = Table(title=f"Measured on this machine ({measured['recorded_at']})")
    for col in ("figure", "predicted MiB", "measured MiB", "within 3% / 8 MiB"):
        table.add_column(col, justify="right")
    for f in measured["figures"]:
        ok = abs(f["predicted_mib"] - f["measured_mib"]) <= max(8, 0.03 * f["measured_mib"])
        table.add_row(
            f["name"],
            f"{f['predicted_mib']:.0f}",
            f"{f['measured_mib']:.1f}",
            "yes" if ok else "no",
        )
    out.print(table)
    speed = measured.get("speed") or {}
    if speed.get("measured_decode"):
        out.print(
            f"speed measured after the serve: {tokens_per_s(speed['measured_decode'])} decode "
            f"(predicted {tokens_per_s(speed.get('predicted_decode'))}), "
            f"{tokens_per_s(speed.get('measured_prompt'))} prompt "
            f"(predicted {tokens_per_s(speed.get('predicted_prompt'))})",
            highlight=False,
        )
    elif speed.get("unmeasurable"):
        out.print(f"speed not measured after the serve: {speed['unmeasurable']}", highlight=False)


def _speed(p: Plan) -> None:
    if p.speed is None:
        return
    s = p.speed
    what = "expected speed (assumed CPU figures)" if s.assumed else "expected speed"
    out.print(
        f"{what}: {tokens_per_s(s.decode_tokens_per_s)} decode, "
        f"{tokens_per_s(s.prompt_tokens_per_s)} prompt (512 tokens)",
        highlight=False,
    )
    for line in s.basis:
        out.print(f"  from {line}", highlight=False, soft_wrap=True, markup=False)


def tokens_per_s(value: float | None) -> str:
    if value is None:
        return "? tokens/s"
    return f"{value:.3g} tokens/s" if value < 100 else f"{value:.0f} tokens/s"


# Reasons as the tables show them (the plan's JSON keeps the whole text): the usual phrases
# shortened so a reason reads in two lines of an 80-column terminal.
NUM = r"([\d.]+)"
SHORTER = (
    (rf"needs {NUM} GiB on ([\w:+]+), {NUM} GiB free after reserve", r"needs \1 GiB, \2 has \3"),
    (rf"needs {NUM} GiB of RAM, {NUM} GiB available after reserve", r"needs \1 GiB, RAM has \2"),
    (r", but no split of whole layers fits every card", ", no split of whole layers fits"),
    (rf"fits, but decodes at about {NUM} tokens/s, below (--min-tokens-per-s {NUM})",
     r"fits; slower than \2"),
    (r" GPTQ is not supported by exllamav2", " GPTQ: not in exllamav2"),
)  # fmt: skip
REASON_LINES = 2
TABLE_PAD = 2  # a simple table's room between columns: one space of padding, one rule


def short_reason(reason: str) -> str:
    for pattern, replacement in SHORTER:
        reason = re.sub(pattern, replacement, reason)
    return reason


def short_quant(quant: str) -> str:
    """A quant as the narrow tables show it: GPTQ's `-actorder` as `-act`."""
    return quant.replace("-actorder", "-act")


def rejections(items: list[Rejected], *, title: str) -> None:
    """The candidates that lost, one line each where the terminal allows: the model name whole,
    the reason shortened and cut to two lines (`--json` has every reason in full). The quant
    names the backend: GGUF quants run on llama.cpp, GPTQ ones on exllamav2."""
    rows = [
        [
            r.model,
            short_quant(r.quant),
            gib(r.miss_mib) if r.miss_mib else "-",
            f"{r.decode_tokens_per_s:.3g}" if r.decode_tokens_per_s else "-",
        ]
        for r in items
    ]
    heads = ["model", "quant", "misses by", "tok/s"]
    fixed = [max(len(c) for c in col) for col in zip(heads, *rows)]
    width = max(out.width - sum(fixed) - TABLE_PAD * len(fixed) - 1, 16)
    table = simple_table(title)
    for head in heads:
        table.add_column(head, no_wrap=True)
    table.add_column("reason", min_width=width, max_width=width)
    for cells, r in zip(rows, items):
        table.add_row(*cells, _lines(short_reason(r.reason), width))
    out.print(table)


def _lines(text: str, width: int) -> Text:
    """`text` wrapped to `width`, at most REASON_LINES lines (the last cut with an ellipsis)."""
    lines = textwrap.wrap(
        text, width, max_lines=REASON_LINES, placeholder=" …", break_on_hyphens=False
    )
    return Text("\n".join(lines or [""]))


def simple_table(title: str | None = None, caption: str | None = None) -> Table:
    """A table without vertical rules, so narrow terminals keep their width for the text."""
    return Table(
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1, 0, 0),
        caption_justify="left",
    )


def pull_result(result) -> None:
    table = Table(title="dry run" if result.dry_run else None)
    for col in ("file", "size", "cached"):
        table.add_column(col)
    for f in result.files:
        size = f"{f.size / 1e9:.2f} GB" if f.size is not None else "?"
        table.add_row(f.name, size, "yes" if f.cached else "no")
    out.print(table)
    out.print(result.summary(), highlight=False, soft_wrap=True)


def note(message: str) -> None:
    err.print(message, highlight=False, soft_wrap=True)


class LoadingLine:
    """A progress line every few seconds while the backend loads (stderr, never stdout)."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s, self.last = every_s, -1e9

    def __call__(self, progress) -> None:
        if progress.elapsed_s - self.last < self.every_s:
            return
        self.last = progress.elapsed_s
        tail = f": {progress.last_line[:80]}" if progress.last_line else ""
        note(
            f"loading (attempt {progress.attempt}) {progress.elapsed_s:.0f} s of at most "
            f"{progress.timeout_s:.0f} s{tail}"
        )


def serving(
    url: str,
    model_id: str,
    *,
    keyed: bool,
    keys_file: Path | None = None,
    slow: str | None = None,
    aliases: list[str] | None = None,
) -> None:
    """The ready line with a curl and an openai snippet to paste, and, for a plan expected
    to decode below reading speed, the plan's `slow` warning (what would be faster).

    The key itself is never printed (this line ends up in journald and docker logs): the
    snippets read it from $LLMUP_API_KEY in the shell they are pasted into, whether the keys
    came from flags, the environment or a keys file (a docker secret), which it names.
    """
    out.print(f"[bold green]ready[/bold green]: {model_id} at {url}/v1", highlight=False)
    if aliases:
        names = ", ".join("any name" if a == "*" else a for a in aliases)
        out.print(f"  also answers to: {names}", highlight=False, soft_wrap=True, markup=False)
    if slow:
        out.print(f"  [yellow]slow:[/yellow] {escape(slow)}", highlight=False, soft_wrap=True)
    auth = ' -H "Authorization: Bearer $LLMUP_API_KEY"' if keyed else ""
    key = "$LLMUP_API_KEY" if keyed else "none"
    if keyed:
        where = f" (keys file: {keys_file})" if keys_file is not None else ""
        out.print(
            f"  (set LLMUP_API_KEY in your shell to one of the configured keys{where})",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    out.print(
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
        f'-H \'X-Session-Id: demo\' -d \'{{"model": "{model_id}", "messages": '
        f'[{{"role": "user", "content": "Hello"}}]}}\'',
        highlight=False,
        soft_wrap=True,
        markup=False,
    )
    out.print(
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', "
        f"api_key='{key}'); print(c.chat.completions.create(model='{model_id}', "
        f"messages=[{{'role': 'user', 'content': 'Hello'}}]).choices[0].message.content)\"",
        highlight=False,
        soft_wrap=True,
        markup=False,
    )


def pins(rows: list[tuple[str, str, str | None]]) -> None:
    table = Table(title="Pinned sources (what `llmup pull` downloads)")
    for col in ("repository", "revision", "commit"):
        table.add_column(col)
    for repo, revision, commit in rows:
        table.add_row(repo, revision, commit or "(not pinned yet: the first pull pins it)")
    out.print(table)


def pin_changes(changes: list) -> None:
    table = Table(title="Pins refreshed from the hub")
    for col in ("repository", "revision", "was", "now"):
        table.add_column(col)
    for c in changes:
        now = c.new if c.error is None else f"kept: {c.error}"
        was = (c.old or "-")[:12]
        table.add_row(c.repo_id, c.revision, was, now if c.new == c.old else f"{now} (new)")
    out.print(table)


def warning(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def device_memory(p: Plan) -> str:
    """Need of budget per device, in GiB: "cuda:0 15.2/22.6, RAM 0.9/118.2"."""
    parts = [
        f"{d.device} {d.need_mib / 1024:.1f}/{d.budget_mib / 1024:.1f}" for d in p.placement.devices
    ]
    if p.placement.ram_need_mib:
        pl = p.placement
        parts.append(f"RAM {pl.ram_need_mib / 1024:.1f}/{pl.ram_budget_mib / 1024:.1f}")
    return ", ".join(parts)


ASSUMED_MARK = "*"


def profiles(rows) -> None:
    """`llmup profiles`: each machine profile and what it plans on its own hardware. The short
    columns come first and never wrap (the model name stays whole at 80 columns); memory wraps
    last; the machines' descriptions follow in a table of their own."""
    assumed = any(r.plan and r.plan.speed and r.plan.speed.assumed for r in rows)
    caption = (
        f"{ASSUMED_MARK} assumed: a described CPU (typical figures for its memory and cores)"
        if assumed
        else None
    )
    table = simple_table("Machine profiles (each planned on its own hardware)", caption)
    for col in ("profile", "model", "quant", "backend", "tok/s"):
        table.add_column(col, no_wrap=True)
    table.add_column("memory GiB: need/budget", min_width=16)
    for row in rows:
        p, plan_ = row.profile, row.plan
        if plan_ is None:
            table.add_row(p.name, "nothing fits", "", "", "", row.error or "")
            continue
        table.add_row(
            p.name,
            plan_.model.id,
            plan_.quant,
            plan_.backend,
            decode_cell(plan_),
            device_memory(plan_),
        )
    out.print(table)
    machines = simple_table()
    machines.add_column("profile", no_wrap=True)
    machines.add_column("machine")
    for row in rows:
        machines.add_row(row.profile.name, row.profile.description)
    out.print(machines)


def decode_cell(p: Plan) -> str:
    """Expected decode tokens/s, marked when it rests on assumed CPU figures."""
    speed = p.speed
    if speed is None or speed.decode_tokens_per_s is None:
        return "?"
    value = speed.decode_tokens_per_s
    text = f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return text + (ASSUMED_MARK if speed.assumed else "")


def error(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
