"""The relay reads the backend's SSE bytes as they come: events split across reads, CRLF or LF
line ends, comments and blank lines skipped, nothing after `[DONE]`."""

from __future__ import annotations

from launcher.proxy.relay import SseLines


def test_lines_split_across_reads_come_out_whole() -> None:
    stream = b': ping\r\n\r\ndata: {"a": 1}\r\n\r\nevent: x\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    for cut in range(1, len(stream)):
        lines = SseLines()
        got = lines.feed(stream[:cut]) + lines.feed(stream[cut:])
        assert [line.strip() for line in got] == [b'data: {"a": 1}', b'data: {"b": 2}']
        assert lines.done


def test_several_events_of_one_read_and_nothing_after_done() -> None:
    lines = SseLines()
    got = lines.feed(b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\ndata: {"c": 3}\n\n')
    assert got == [b'data: {"a": 1}', b'data: {"b": 2}'] and lines.done
    assert lines.feed(b'data: {"d": 4}\n\n') == []


def test_a_stream_without_done_is_not_done() -> None:
    lines = SseLines()
    assert lines.feed(b'data: {"a": 1}\n\ndata: {"b"') == [b'data: {"a": 1}']
    assert not lines.done
