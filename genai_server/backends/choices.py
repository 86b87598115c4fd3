"""Chat choices as the OpenAI API writes them, from the text a backend generates: one place decides where the role
goes, how calls are streamed and which finish reason a choice ends with."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass

from genai_server.embedded.logprobs import TokenLogprob
from genai_server.embedded.tool_calls import CallReader, ToolCall
from genai_server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatDelta,
    ChatLogprobs,
    CompletionLogprobs,
    FinishReason,
    FunctionCall,
    FunctionDelta,
    TokenLogprobOut,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
)


@dataclass(frozen=True)
class Piece:
    """New text of one choice; ``finish`` is set on the choice's last piece."""

    index: int
    text: str
    tokens: int
    finish: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # the piece's tokens', when the request asked for them
    reasoning: str = ""  # new thinking of a reasoning model (``reasoning.py``), before its answer


class ChoiceWriter:
    """One streamed chat choice: the role goes with its first generated content (so every client's time to first
    token means the first token, as vLLM's does), calls go out as OpenAI streams them (id, type and name, then the
    arguments), and a choice whose calls ended it finishes with ``tool_calls``."""

    def __init__(self, index: int, reader: CallReader | None, *, logprobs: bool = False) -> None:
        self._index = index
        self._reader = reader
        self._started = False
        self._calls = 0
        self._logprobs = logprobs
        self._pending: list[TokenLogprob] = []  # tokens of text still held back (a call being written)

    def choices(self, piece: Piece) -> list[ChatChunkChoice]:
        """The chunk choices one piece of generated text makes (none while a call is still being written)."""
        text, calls = _read(self._reader, piece)
        deltas = [ChatDelta(reasoning_content=piece.reasoning, reasoning=piece.reasoning)] if piece.reasoning else []
        deltas += [ChatDelta(content=text)] if text else []
        for call in calls:
            deltas.append(self._call_header(call))
            deltas.append(
                ChatDelta(
                    tool_calls=[ToolCallDelta(index=self._calls, function=FunctionDelta(arguments=call.arguments))]
                )
            )
            self._calls += 1
        if piece.finish and not self._started and not deltas:
            deltas.append(ChatDelta(content=""))
        if deltas and not self._started:
            deltas[0].role, self._started = "assistant", True
        out = [ChatChunkChoice(index=self._index, delta=d) for d in deltas]
        if piece.finish:
            finish = finish_with_calls(piece.finish, self._calls)
            out.append(ChatChunkChoice(index=self._index, delta=ChatDelta(), finish_reason=finish))
        self._pending.extend(piece.logprobs)
        if out and self._logprobs:  # the tokens go with the first chunk that shows their text
            out[0].logprobs, self._pending = chat_logprobs(self._pending), []
        return out

    def _call_header(self, call: ToolCall) -> ChatDelta:
        header = ToolCallDelta(
            index=self._calls, id=call.id, type="function", function=FunctionDelta(name=call.name, arguments="")
        )
        return ChatDelta(tool_calls=[header])


def _read(reader: CallReader | None, piece: Piece) -> tuple[str, list[ToolCall]]:
    """A piece's text through the choice's call reader (if it reads calls), finished on the choice's last piece."""
    if reader is None:
        return piece.text, []
    text, calls = reader.feed(piece.text)
    if piece.finish:
        rest, more = reader.finish(cut=piece.finish == "length")
        text, calls = text + rest, calls + more
    return text, calls


def chat_choice(
    index: int,
    text: str,
    finish: FinishReason,
    reader: CallReader | None,
    logprobs: Sequence[TokenLogprob] | None = None,
    reasoning: str = "",
) -> ChatChoice:
    """A whole chat choice: its text, and the calls read out of it (content is null when there is only calls), and
    a reasoning model's thinking under both its names."""
    content, calls = _read(reader, Piece(index, text, 0, finish))
    message = AssistantMessage(
        reasoning_content=reasoning or None,
        reasoning=reasoning or None,
        content=content if content or not calls else None,
        tool_calls=[ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
        or None,
    )
    return ChatChoice(
        index=index,
        message=message,
        finish_reason=finish_with_calls(finish, len(calls)),
        logprobs=None if logprobs is None else chat_logprobs(logprobs),
    )


def chat_logprobs(items: Sequence[TokenLogprob]) -> ChatLogprobs:
    """Tokens' log probabilities in the chat shape."""
    return ChatLogprobs(
        content=[
            TokenLogprobOut(
                token=item.token,
                logprob=item.logprob,
                bytes=list(item.raw),
                top_logprobs=[TopLogprob(token=a.token, logprob=a.logprob, bytes=list(a.raw)) for a in item.top],
            )
            for item in items
        ]
    )


def completion_logprobs(items: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
    """Tokens' log probabilities in the text completion shape; ``offset``: where the first token's text begins."""
    offsets = []
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # as the completion's text is decoded
    for item in items:
        offsets.append(offset)
        offset += len(text.decode(item.raw))
    return CompletionLogprobs(
        tokens=[item.token for item in items],
        token_logprobs=[item.logprob for item in items],
        top_logprobs=[{a.token: a.logprob for a in item.top} or {item.token: item.logprob} for item in items],
        text_offset=offsets,
    )


def finish_with_calls(finish: FinishReason, calls: int) -> FinishReason:
    """An answer that ended on its own after calling tools ends with ``tool_calls``."""
    return "tool_calls" if calls and finish == "stop" else finish
