"""JSON replies on exllamav2: lm-format-enforcer's parsers as an exllamav2 sampling filter.

exllamav2 has no grammar engine of its own; its dynamic generator takes `filters`, objects
that say before each token which token ids may come next. TabbyAPI builds them from
lm-format-enforcer, and so does this module: `ReplyFilter` speaks exllamav2 0.3's filter
protocol (`exllamav2.generator.filters.ExLlamaV2Filter`: begin / feed / next, run on the
generator's background thread while the GPU works) over a `TokenEnforcer`, which walks the
vocabulary's prefix tree with a character-level parser of the JSON schema.

The enforcer's view of the vocabulary (`tokenizer_data`) is built from what the worker already
holds, each token's text (`ExLlamaV2Tokenizer.get_id_to_piece_list()`), not from
lm-format-enforcer's exllamav2 integration, which imports torch and exllamav2: so this module
runs, and is tested, on the CPU. Tokens that decode to nothing or to part of a UTF-8
character, and tokens with control characters other than newlines, are left out: the
enforcer would allow them anywhere (nothing) or put them raw inside a JSON string, where JSON
forbids them.

This module imports lm-format-enforcer (which imports torch when it is installed); the worker
imports it only once its runtime check has passed (`ExllamaGenerator.load`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lmformatenforcer import (
    CharacterLevelParser,
    CharacterLevelParserConfig,
    JsonSchemaParser,
    SequenceParser,
    StringParser,
    TokenEnforcer,
    TokenEnforcerTokenizerData,
    UnionParser,
)

from launcher.reply_format import ARGS_KEY, CALL_HEAD, CALL_TAIL, GrammarSpec, ToolDef
from launcher.workers.exllamav2.json_schemas import normalized

NEWLINES = "\n\r"


@dataclass(frozen=True)
class Vocabulary:
    """Each token id's text as the tokenizer decodes it alone, and the ids that are not text."""

    pieces: Sequence[str]
    eos: int
    special: frozenset[int] = frozenset()


def usable(piece: str) -> bool:
    """Whether a token may take part in JSON (see the module docstring)."""
    if not piece or "\ufffd" in piece:
        return False
    return not any(ord(c) < 0x20 and c not in NEWLINES for c in piece)


def tokenizer_data(vocab: Vocabulary) -> TokenEnforcerTokenizerData:
    """The enforcer's prefix tree over the vocabulary (a second or so for 32,000 tokens:
    built once per model)."""
    pieces = vocab.pieces
    regular = [
        (i, piece, piece.startswith(" "))
        for i, piece in enumerate(pieces)
        if i not in vocab.special and usable(piece)
    ]

    def decode(ids: list[int]) -> str:
        return "".join(pieces[i] for i in ids)

    return TokenEnforcerTokenizerData(regular, decode, vocab.eos, False, len(pieces))


def reply_parser(spec: GrammarSpec) -> CharacterLevelParser:
    """The character-level parser of what the reply must be: JSON of the response_format's
    schema (any object without one), or a forced call of one of the tools, written exactly
    as `reply_format.format_call` writes it (one call: a forced reply may hold one)."""
    if spec.json is not None:
        schema = spec.json.schema if spec.json.schema is not None else {"type": "object"}
        return _json(schema)
    if spec.tools and spec.forced:
        calls = [_call_parser(tool) for tool in spec.tools]
        return calls[0] if len(calls) == 1 else UnionParser(calls)
    raise ValueError("the exllamav2 filter constrains JSON replies and forced calls only")


def _call_parser(tool: ToolDef) -> CharacterLevelParser:
    return SequenceParser(
        [
            StringParser(f"{CALL_HEAD}{tool.name}{ARGS_KEY}"),
            _json(tool.parameters),
            StringParser(CALL_TAIL),
        ]
    )


def _json(schema: dict[str, Any]) -> CharacterLevelParser:
    return StrictJson(JsonSchemaParser(normalized(schema)))


class StrictJson(CharacterLevelParser):
    """lm-format-enforcer 0.11's JSON parser, less two things it lets through: a `}` or `]`
    right after a comma (a trailing comma, which JSON forbids), and exponents, with which a
    sampled "integer" like 9E506 reads back as infinity. Only text outside strings is
    touched: a string is the inner parser's alone (and keeps its fast path)."""

    def __init__(
        self, inner: CharacterLevelParser, state: tuple[bool, bool, str] = (False, False, "")
    ):
        self.inner = inner
        self.state = state  # (inside a string, after a backslash there, last character outside)

    @property
    def config(self) -> CharacterLevelParserConfig:
        return self.inner.config

    @config.setter
    def config(self, new_config: CharacterLevelParserConfig) -> None:
        self.inner.config = new_config

    def add_character(self, new_character: str) -> CharacterLevelParser:
        return StrictJson(self.inner.add_character(new_character), _step(self.state, new_character))

    def get_allowed_characters(self) -> str:
        allowed = self.inner.get_allowed_characters()
        in_string, _, last = self.state
        if in_string:
            return allowed
        banned = "}]" if last == "," else "eE" if last.isdigit() or last == "." else ""
        return "".join(c for c in allowed if c not in banned)

    def can_end(self) -> bool:
        return self.inner.can_end()

    def shortcut_key(self) -> Hashable | None:
        return self.inner.shortcut_key() if self.state[0] else None

    def cache_key(self) -> Hashable | None:
        key = self.inner.cache_key()
        return None if key is None else (key, self.state)


def _step(state: tuple[bool, bool, str], char: str) -> tuple[bool, bool, str]:
    """The JSON lexer state after `char` (strings and their escapes; the last character
    outside them that is not whitespace)."""
    in_string, escaped, last = state
    if in_string:
        if escaped:
            return True, False, last
        return (char != '"', char == "\\", '"' if char == '"' else last)
    if char == '"':
        return True, False, last
    return False, False, last if char in " \t\n\r" else char


class ReplyFilter:
    """exllamav2 0.3's filter protocol over one request's `TokenEnforcer`.

    `next()` gives the allowed ids (a sorted list: `allow_return_type_list`) and no
    filter-specific end tokens: the reply ends with the end-of-sequence token, which the
    enforcer allows once the JSON is complete (and the job prefers then:
    `filter_prefer_eos`). The enforcer caches its state per generated prefix, so `next` only
    parses the newest token's characters."""

    allow_return_type_list = True

    def __init__(self, data: TokenEnforcerTokenizerData, parser: CharacterLevelParser) -> None:
        self.enforcer = TokenEnforcer(data, parser)
        self.tokens: list[int] = []
        self.background_result: Future | None = None

    def clone(self, c: Any = None) -> ReplyFilter:
        copy = ReplyFilter.__new__(ReplyFilter)
        copy.enforcer, copy.tokens, copy.background_result = self.enforcer, list(self.tokens), None
        return copy

    def begin(self, prefix_str: str) -> None:
        self.tokens = []

    def feed(self, token: Any) -> None:
        """`token` is the sampled id as a (1, 1) tensor."""
        self.tokens.append(int(token[0][0]))

    def next(self) -> tuple[list[int], list[int]]:
        allowed = self.enforcer.get_allowed_tokens(self.tokens).allowed_tokens
        return sorted(set(allowed)), []

    def use_background_worker(self) -> bool:
        return True  # a parser walk is CPU work: overlap it with the forward pass

    def can_mask_logits(self) -> bool:
        return False

    def background_next(self, pool: ThreadPoolExecutor) -> None:
        self.background_result = pool.submit(self.next)

    def background_drop(self) -> None:
        if self.background_result is not None:
            self.background_result.result()
            self.background_result = None

    def get_next(self, mask: bool = False) -> tuple[list[int], list[int]]:
        if self.background_result is None:
            return self.next()
        result, self.background_result = self.background_result.result(), None
        return result
