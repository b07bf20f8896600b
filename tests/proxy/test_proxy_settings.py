"""Keys, bind safety and the proxy's environment settings."""

from __future__ import annotations

import pytest
from conftest import run_cli

from launcher import render
from launcher.errors import InsecureBindError, InvalidApiKeyError, UsageError
from launcher.netaddr import free_port
from launcher.proxy.auth import KeyRing, check_bind, configured_keys, owner_of
from launcher.settings import Settings


def test_keyring_accepts_only_configured_bearer_keys() -> None:
    ring = KeyRing(["alpha", "beta"])
    assert ring.owner("Bearer alpha") == owner_of("alpha")
    assert ring.owner("bearer beta") == owner_of("beta") != owner_of("alpha")
    for header in (None, "", "Bearer", "Basic alpha", "Bearer alph", "Bearer alphaa"):
        with pytest.raises(InvalidApiKeyError):
            ring.owner(header)
    assert KeyRing([]).owner(None) == ""  # no keys: one anonymous owner
    assert "alpha" not in owner_of("alpha")  # the store never holds a key


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_binds_need_no_key(host) -> None:
    check_bind(host, [])


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "myhost.example"])
def test_public_binds_need_a_key_or_an_explicit_opt_out(host) -> None:
    with pytest.raises(InsecureBindError, match="without an API key"):
        check_bind(host, [])
    check_bind(host, ["k"])
    check_bind(host, [], insecure_no_auth=True)


def test_short_environment_names(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LLMUP_API_KEY", "one")
    monkeypatch.setenv("LLMUP_API_KEYS", "two, three,,")
    monkeypatch.setenv("LLMUP_CONTEXT_POLICY", "error")
    monkeypatch.setenv("LLMUP_SESSION_TTL", "12h")
    proxy = Settings().proxy
    assert set(configured_keys(proxy)) == {"one", "two", "three"}
    assert proxy.context_policy == "error" and proxy.session_ttl == 12 * 3600


def test_keys_file(monkeypatch, tmp_path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nfirst\n\n  second  \n")
    monkeypatch.setenv("LLMUP_API_KEYS_FILE", str(keys))
    assert configured_keys(Settings().proxy) == ["first", "second"]
    monkeypatch.setenv("LLMUP_PROXY__API_KEYS_FILE", str(tmp_path / "other"))  # the long name wins
    assert Settings().proxy.api_keys_file == tmp_path / "other"
    keys.unlink()
    monkeypatch.delenv("LLMUP_PROXY__API_KEYS_FILE")
    with pytest.raises(UsageError, match="cannot read the API keys file"):
        configured_keys(Settings().proxy)
    keys.write_text("# nothing but a comment\n")
    with pytest.raises(UsageError, match="holds no key"):
        configured_keys(Settings().proxy)
    monkeypatch.setenv("LLMUP_API_KEY", "from-env")  # compose: an empty secret beside .env's key
    assert configured_keys(Settings().proxy) == ["from-env"]


@pytest.mark.parametrize("name", ["LLMUP_API_KEYS", "LLMUP_PROXY__API_KEYS"])
@pytest.mark.parametrize("exists", [False, True])
def test_a_path_in_the_keys_list_is_refused_not_taken_as_a_key(monkeypatch, tmp_path, name, exists):
    keys = tmp_path / "api-keys.txt"
    if exists:
        keys.write_text("real-key\n")
    for value in (str(keys), f"good,{keys}", "~/keys.txt", "./keys.txt"):
        monkeypatch.setenv(name, value)
        with pytest.raises(UsageError, match="looks like a path.*LLMUP_API_KEYS_FILE"):
            Settings()
    monkeypatch.setenv(name, "sk-a/b+c=,plain")  # a slash inside a key is fine
    assert configured_keys(Settings().proxy) == ["sk-a/b+c=", "plain"]


@pytest.mark.parametrize(
    ("env", "args", "needle"),
    [
        ({"LLMUP_API_KEYS": "/etc/llmup/api-keys.txt"}, [], "LLMUP_API_KEYS_FILE"),
        ({"LLMUP_API_KEYS_FILE": "/etc/llmup/api-keys.txt"}, [], "cannot read the API keys file"),
        ({}, ["--api-key-file", "/etc/llmup/api-keys.txt"], "cannot read the API keys file"),
        ({}, ["--api-key-file", "EMPTY"], "holds no key"),
    ],
)
def test_serve_stops_on_a_keys_setting_it_cannot_use(tmp_path, env, args, needle) -> None:
    """The issue's case: a keys file that is not there never becomes a key (fail open on
    0.0.0.0); serve says so in one line, exit 2, before anything is planned or bound."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    port = str(free_port())
    res = run_cli("serve", "--host", "0.0.0.0", "--port", port, "--model-file", "x.gguf", *args,
                  env=env)  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_serve_help_says_command_line_keys_are_visible() -> None:
    text = " ".join(run_cli("serve", "--help").stdout.split())
    assert "--api-key-file" in text and "Visible to every local user in `ps`" in text
    assert "--allowed-host" in text


def test_ready_line_with_keys_from_a_file_reads_the_key_from_the_shell(
    monkeypatch, tmp_path, capsys
) -> None:
    keys = tmp_path / "secret"
    keys.write_text("k-from-the-file\n")
    monkeypatch.setenv("LLMUP_PROXY__API_KEYS_FILE", str(keys))  # what compose.yaml sets
    proxy = Settings().proxy
    keyed = bool(configured_keys(proxy))
    render.serving("http://0.0.0.0:8000", "tiny", keyed=keyed, keys_file=proxy.api_keys_file)
    out = capsys.readouterr().out
    assert "api_key='$LLMUP_API_KEY'" in out and 'Bearer $LLMUP_API_KEY"' in out
    assert f"keys file: {keys}" in out
    assert "k-from-the-file" not in out and "api_key='none'" not in out


def test_default_ttl_is_seven_days() -> None:
    assert Settings().proxy.session_ttl == 7 * 86400


@pytest.mark.parametrize("name", ["LLMUP_SESSION_TTL", "LLMUP_PROXY__SESSION_TTL"])
def test_session_ttl_one_validation_for_both_spellings(monkeypatch, name) -> None:
    monkeypatch.setenv(name, "-60")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Settings()
    monkeypatch.setenv(name, "0")  # 0: sessions never expire (no longer ignored)
    assert Settings().proxy.session_ttl == 0
    monkeypatch.setenv(name, "30m")
    assert Settings().proxy.session_ttl == 1800


def test_the_explicit_nested_ttl_wins_over_the_short_name(monkeypatch) -> None:
    monkeypatch.setenv("LLMUP_SESSION_TTL", "0")
    monkeypatch.setenv("LLMUP_PROXY__SESSION_TTL", "1h")
    assert Settings().proxy.session_ttl == 3600
