"""The Llama-2 chat prompt, exactly as Meta's reference `chat_completion` builds it.

Meta's code (llama/generation.py) folds the system message into the first user turn, then
tokenizes every completed exchange on its own as ``BOS + "[INST] {user} [/INST] {answer} " +
EOS`` and the open turn as ``BOS + "[INST] {user} [/INST]"``. Each piece is tokenized
separately, and BOS/EOS are token ids, never text: a user typing "</s>" must not end a turn.

So `build_prompt` returns segments, and the tokenizer must encode each segment with
``add_bos=True``, ``add_eos=segment.eos`` and special-token parsing off. `Llama2Prompt.text`
joins them with literal ``<s>``/``</s>`` for logs, tests and tokenizers that parse special
tokens (its token count can differ from the segmented encoding by a token at a boundary).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
BOS_TEXT, EOS_TEXT = "<s>", "</s>"


@dataclass(frozen=True)
class PromptSegment:
    """One separately tokenized piece: always BOS-prefixed, EOS-terminated when `eos`."""

    text: str
    eos: bool


@dataclass(frozen=True)
class Llama2Prompt:
    segments: tuple[PromptSegment, ...]

    @property
    def text(self) -> str:
        return "".join(BOS_TEXT + seg.text + (EOS_TEXT if seg.eos else "") for seg in self.segments)


def _fold_system(messages: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Meta puts the system prompt inside the first user message, between <<SYS>> markers."""
    dialog = list(messages)
    if dialog and dialog[0][0] == "system":
        if len(dialog) < 2:
            raise ValueError("a system message must be followed by a user message")
        role, content = dialog[1]
        dialog = [(role, B_SYS + dialog[0][1] + E_SYS + content), *dialog[2:]]
    return dialog


def _check_roles(dialog: Sequence[tuple[str, str]], offset: int) -> None:
    """Llama-2 was trained on strict user/assistant alternation ending with the user.

    `offset` is 1 when a system message was folded away, so errors name the caller's index.
    """
    if not dialog:
        raise ValueError("messages must contain at least one user message")
    for i, (role, _) in enumerate(dialog):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"messages[{i + offset}] has role {role!r}, expected {expected!r}: roles must "
                "alternate user/assistant starting with user, after at most one system message"
            )
    if dialog[-1][0] != "user":
        raise ValueError("the last message must come from the user")


def build_prompt(
    messages: Sequence[tuple[str, str]], *, prefill: str | None = None
) -> Llama2Prompt:
    """Turn (role, content) pairs into Meta's Llama-2 chat prompt segments; `prefill` is the
    beginning of the answer to the last user message, which the model continues.

    Raises ValueError when the roles are not [system], user, assistant, user, ... user.
    """
    dialog = _fold_system(messages)
    _check_roles(dialog, offset=len(messages) - len(dialog))
    segments = [
        PromptSegment(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", eos=True)
        for (_, user), (_, answer) in zip(dialog[:-1:2], dialog[1::2])
    ]
    last = f"{B_INST} {dialog[-1][1].strip()} {E_INST}"
    if prefill:
        last += " " + prefill.lstrip()
    segments.append(PromptSegment(last, eos=False))
    return Llama2Prompt(tuple(segments))


def prompt_tokens(
    encode: Callable[..., list[int]],
    messages: Sequence[Mapping[str, Any]],
    *,
    prefill: str | None = None,
) -> list[int]:
    """The token ids of a chat's Llama-2 prompt: each segment encoded on its own with BOS
    (and EOS when closed). `encode(text, bos=, eos=)` is a tokenizer's; `messages` are
    `{"role", "content"}` dicts ("developer" is the system role); a conversation in the
    wrong order is a ValueError."""
    turns = [
        ("system" if m["role"] == "developer" else m["role"], m.get("content") or "")
        for m in messages
    ]
    prompt = build_prompt(turns, prefill=prefill)
    return [t for seg in prompt.segments for t in encode(seg.text, bos=True, eos=seg.eos)]
