"""Keys, bind safety and the proxy's environment settings."""

from __future__ import annotations

import pytest

from launcher import render
from launcher.errors import InsecureBindError, InvalidApiKeyError, UsageError
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
    monkeypatch.setenv("LLMUP_API_KEYS", str(keys))
    assert configured_keys(Settings().proxy) == ["first", "second"]
    keys.unlink()
    monkeypatch.setenv("LLMUP_PROXY__API_KEYS_FILE", str(keys))
    monkeypatch.delenv("LLMUP_API_KEYS")
    with pytest.raises(UsageError, match="cannot read the API keys file"):
        configured_keys(Settings().proxy)


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
