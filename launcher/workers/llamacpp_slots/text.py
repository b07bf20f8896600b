"""Text to tokens for the llama.cpp worker: tokenizing, counting, and chat prompts.

A chat is rendered with the GGUF's own `tokenizer.chat_template` exactly as llama-cpp-python
renders it (its `Jinja2ChatFormatter`: the same Jinja environment, BOS/EOS texts and
`add_generation_prompt`), then tokenized with special tokens parsed and no extra BOS, as
llama-cpp-python does for a template. A file without a template gets Meta's Llama-2 chat
format (the catalog's models), one BOS per segment. A template that knows tools gets them
(`chat_render`); a reply to continue (prefill) is appended to the rendered prompt.
Tokenizing only reads the vocabulary, so it runs on the HTTP layer's worker threads (several
at once) while the engine thread decodes.
"""

from __future__ import annotations

from jinja2 import TemplateError
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from launcher.workers.chat_render import ChatTurns, knows_tool_calls
from launcher.workers.llama2_chat import prompt_tokens
from launcher.workers.llamacpp_slots.native import NativeModel

TEMPLATE_KEY = "tokenizer.chat_template"


class LlamaText:
    """The worker's `Tokenizer` and chat renderer for one loaded model."""

    def __init__(self, model: NativeModel) -> None:
        self.model = model
        self.vocab_size = model.vocab_size
        template = model.meta(TEMPLATE_KEY)
        self.knows_tools = knows_tool_calls(template)
        self.formatter = None
        if template:
            self.formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_text(model.eos),
                bos_token=model.token_text(model.bos),
                stop_token_ids=[model.eos],
            )

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, special: bool = False
    ) -> list[int]:
        tokens = self.model.tokenize(text, add_special=bos, parse_special=special)
        return [*tokens, self.model.eos] if eos else tokens

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text, bos=True, special=True))

    def chat_prompt(self, turns: ChatTurns) -> list[int]:
        """The prompt for a conversation (`chat_render`), ending in the text of a reply to
        continue when there is one; a template's own error is a ValueError."""
        if self.formatter is None:
            return prompt_tokens(self.encode, turns.messages, prefill=turns.prefill)
        try:
            rendered = self.formatter(messages=turns.messages, tools=turns.tools)
        except TemplateError as exc:
            raise ValueError(f"the model's chat template failed: {exc}") from exc
        prompt = rendered.prompt + (turns.prefill or "")
        return self.encode(prompt, bos=not rendered.added_special, special=True)
