"""Stand-ins for the exllamav2 worker's tests on the CPU: `FakeGenerator` behind the worker's
`Generator` interface (characters are tokens), the worker's app served by real uvicorn
(`serving`), and `StubEngine` / `StubTokenizer` / `StubLogits` shaped like exllamav2 0.3's
dynamic generator, so `ExllamaGenerator`'s glue runs without torch (`stub_generator`)."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from launcher.workers.exllamav2.server import create_app
from launcher.workers.generation import GenerationParams, TokenEvent, TokenLogprob, TopLogprob

MODEL = "llama-2-7b-chat-gptq"
REPLY = "Hello there! How can I help you today?"
BOS, EOS, OFFSET = 1, 2, 3


class FakeGenerator:
    """Characters are tokens (id = code point + 3; BOS 1, EOS 2); each word of `reply` is one
    generated token. Records prompts, params and whether a generation was cut short."""

    vocab_size = 0x110000 + OFFSET

    def __init__(
        self,
        reply: str = REPLY,
        delay: float = 0.0,
        fail_after: int | None = None,
        failure: str = "tokenizer glitch",
    ):
        self.reply, self.delay = reply, delay
        self.fail_after, self.failure = fail_after, failure
        self.prompts: list[list[int]] = []
        self.params: list[GenerationParams] = []
        self.cancelled = threading.Event()
        self.started = threading.Event()

    def encode(self, text: str, *, bos=False, eos=False, special=False) -> list[int]:
        parts = re.split(r"(</?s>)", text) if special else [text]
        ids = [BOS] if bos else []
        for part in parts:
            if special and part in ("<s>", "</s>"):
                ids.append(BOS if part == "<s>" else EOS)
            else:
                ids.extend(ord(c) + OFFSET for c in part)
        return ids + ([EOS] if eos else [])

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text, bos=True, special=True))

    def generate(self, prompt, params, cancel) -> Iterator[TokenEvent]:
        self.prompts.append(prompt)
        self.params.append(params)
        self.started.set()
        words = re.findall(r"\S+\s*", self.reply)
        finished = False
        try:
            for i, word in enumerate(words):
                if cancel.is_set():
                    return
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError(self.failure)
                time.sleep(self.delay)
                last = i + 1 == len(words) or i + 1 == params.max_new_tokens
                reason = None if not last else "stop" if i + 1 == len(words) else "length"
                finished = last
                yield TokenEvent(word, 1, reason, logprobs=self.logprobs(word, params))
                if last:
                    return
        finally:
            if not finished:
                self.cancelled.set()

    @staticmethod
    def logprobs(word: str, params: GenerationParams) -> tuple[TokenLogprob, ...]:
        """A made-up log probability per word, with `params.logprobs` alternatives."""
        if params.logprobs is None:
            return ()
        raw = tuple(word.encode())
        top = tuple(TopLogprob(word.upper(), raw, -0.1 * (i + 1)) for i in range(params.logprobs))
        return (TokenLogprob(word, raw, -0.5, top),)


def decode(ids: list[int]) -> str:
    return "".join("<s>" if i == BOS else "</s>" if i == EOS else chr(i - OFFSET) for i in ids)


@contextmanager
def serving(generator: FakeGenerator, max_seq_len: int = 4096) -> Iterator[str]:
    """The worker's app for `generator`, served (see serving_app); yields the base URL."""
    with serving_app(create_app(generator, model_alias=MODEL, max_seq_len=max_seq_len)) as url:
        yield url


@contextmanager
def serving_app(app) -> Iterator[str]:
    """Real uvicorn on a pre-bound 127.0.0.1 socket in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    return error


class StubIds:
    """Stands in for a (1, n) torch tensor of token ids."""

    def __init__(self, ids: list[int]) -> None:
        self.shape = (1, len(ids))
        self._ids = ids

    def __getitem__(self, index: int) -> StubIds:
        return self

    def tolist(self) -> list[int]:
        return self._ids

    def reshape(self, *shape: int) -> StubIds:
        return self


class StubEngine:
    """Replays ExLlamaV2DynamicGenerator.iterate() results as exllamav2 0.3 documents them:
    start and prefill stages, streamed text, and a final eos result carrying `new_tokens`."""

    def __init__(
        self, pieces: list[str], eos_reason: str = "stop_token", logits: list | None = None
    ) -> None:
        self.pieces, self.eos_reason, self.logits = pieces, eos_reason, logits
        self.jobs: list = []
        self.cancelled: list = []
        self._steps = iter(())

    def enqueue(self, job) -> None:
        self.jobs.append(job)
        self._steps = self._replay(job)

    def _replay(self, job):
        other = object()
        yield [{"job": job, "stage": "started", "eos": False}]
        yield [{"job": job, "stage": "prefill", "curr_progress": 3, "max_progress": 3}]
        streamed = self.pieces if self.eos_reason == "stop_token" else self.pieces[:-1]
        for i, piece in enumerate(streamed):
            ours = {"job": job, "stage": "streaming", "eos": False, "text": piece,
                    "token_ids": StubIds([7])}  # fmt: skip
            if self.logits is not None and job.return_logits:
                ours["logits"] = StubLogits(self.logits[i])
            yield [{"job": other, "stage": "streaming", "eos": False, "text": "NOT OURS"}, ours]
        final = {"job": job, "stage": "streaming", "eos": True, "eos_reason": self.eos_reason}
        if self.eos_reason == "stop_token":  # the EOS token is counted but its text is held
            final["new_tokens"] = len(self.pieces) + 1
        else:
            final.update(text=self.pieces[-1], token_ids=StubIds([7]))
            final["new_tokens"] = len(self.pieces)
        yield [final]

    def iterate(self) -> list:
        return next(self._steps, [])

    def cancel(self, job) -> None:
        self.cancelled.append(job)


class StubLogits:
    """Stands in for a (1, 1, vocab) torch tensor of logits."""

    def __init__(self, row: list[float]) -> None:
        self.row = row

    def float(self) -> StubLogits:
        return self

    def cpu(self) -> StubLogits:
        return self

    def numpy(self):
        import numpy as np

        return np.array([[self.row]], dtype=np.float32)


class StubTokenizer:
    """ExLlamaV2Tokenizer's attributes and methods the worker reads; `pieces` is each id's
    text (letters by default)."""

    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 1, 2, None, 0
    extended_id_to_piece: dict[int, str] = {}

    def __init__(self, pieces: list[str] | None = None) -> None:
        self.pieces = pieces or [chr(0x41 + i % 26) for i in range(32000)]

    def get_vocab_size(self) -> int:
        return len(self.pieces)

    def get_id_to_piece_list(self, include_special_tokens: bool = False) -> list[str]:
        return self.pieces

    def encode(self, text, add_bos=False, add_eos=False, encode_special_tokens=False):
        ids = [1] * add_bos + [ord(c) for c in text] + [2] * add_eos
        return StubIds(ids)


def stub_generator(engine, tokenizer: StubTokenizer | None = None):
    from types import SimpleNamespace

    from launcher.workers.exllamav2 import json_filter
    from launcher.workers.exllamav2.engine import ExllamaGenerator

    modules = {
        "torch": SimpleNamespace(tensor=lambda data, dtype: data, long="long"),
        "job": lambda **kwargs: SimpleNamespace(**kwargs),
        "sampler": SimpleNamespace(Settings=SimpleNamespace),
        "json_filter": json_filter,
    }
    return ExllamaGenerator(engine, tokenizer or StubTokenizer(), modules)
