"""Tool calls in model output: parsers per model family, and the grammars that force a call.

A parser reads the text a model generates, streamed (`feed` each new piece, then `finish`) or
whole (`parse`), and splits it into content and OpenAI tool calls. Streaming emits OpenAI's
deltas: a call's first delta has its index, id and function name, the next ones pieces of its
arguments, in the model's own JSON text, so the pieces concatenate to the `parse` result.

Families:
- `HermesToolParser` (Hermes, Qwen 2.5/3, and the default): `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`, any number, with content around them.
- `Llama3JsonToolParser` (Llama 3.1+ JSON tool calling): the whole output is
  `{"name": ..., "parameters": {...}}` (after an optional `<|python_tag|>`), calls joined by `;`.

`tool_choice` "required" or a named function is enforced by `ToolParser.grammar`: a Lark grammar
(for llguidance) of one or more calls in the family's format, each call's arguments validating
against its function's parameters schema.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cluster.responses import (
    AssistantMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
)
from cluster.responses import ToolCall as ToolCallModel
from replicas.sampling_params import StructuredOutputsParams

NAME_KEY = "name"
ARGUMENT_KEYS = ("arguments", "parameters")
# The JSON inside a forced call is printed as json.dumps (and Jinja's tojson) prints it, which is
# how chat templates show calls to the model; no free whitespace for a model to loop on.
CALL_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


@dataclass
class ToolCallDelta:
    """OpenAI's streamed tool-call piece: the first one of a call has `id` and `name`."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def message(self) -> DeltaMessage:
        """As OpenAI streams it (`choices[].delta`)."""
        calls = [
            DeltaToolCall(
                index=d.index,
                id=d.id,
                type="function" if d.id else None,
                function=DeltaFunctionCall(name=d.name, arguments=d.arguments),
            )
            for d in self.tool_calls
        ]
        return DeltaMessage(content=self.content or None, tool_calls=calls or None)


@dataclass
class ParsedOutput:
    content: str | None  # None when the output is only tool calls
    tool_calls: list[ToolCall]

    def message(self) -> AssistantMessage:
        """As OpenAI returns it (`choices[].message`)."""
        calls = [
            ToolCallModel(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in self.tool_calls
        ]
        return AssistantMessage(content=self.content, tool_calls=calls or None)


class _CallScanner:
    """Follows the text of one call object, `{"name": ..., "arguments": {...}}`, character by
    character: reports the name once it is complete and the arguments text as it arrives."""

    def __init__(self) -> None:
        self.text = ""
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.expect = "open"  # open, key, colon, value, string_value, nested_value, scalar, next
        self.key: str | None = None
        self.token_start = 0  # where the current key or depth-1 value began
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None  # exclusive
        self.args_is_string = False
        self.done = False
        self.error = False

    def feed(self, text: str) -> str:
        """Consume `text` until the object closes; returns what is left after it."""
        for i, char in enumerate(text):
            if self.done or self.error:
                return text[i:]
            self.text += char
            self._step(char, len(self.text) - 1)
        return ""

    def _end_value(self, end: int) -> None:
        raw = self.text[self.token_start : end]
        if self.key == NAME_KEY:
            try:
                self.name = json.loads(raw)
            except json.JSONDecodeError:
                self.name = None
            if not isinstance(self.name, str):
                self.name, self.error = None, True
        elif self.key in ARGUMENT_KEYS:
            self.args_end = end
        self.expect = "next"

    def _step(self, char: str, i: int) -> None:  # one JSON lexer state machine
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
                if self.depth == 1 and self.expect == "key":
                    self.key = json.loads(self.text[self.token_start : i + 1])
                    self.expect = "colon"
                elif self.depth == 1 and self.expect == "string_value":
                    self._end_value(i + 1)
            return
        if char.isspace():
            if self.expect == "scalar" and self.depth == 1:
                self._end_value(i)
            return
        if self.expect == "open":
            if char != "{":
                self.error = True
            self.depth, self.expect = 1, "key"
            return
        if char == '"':
            self.in_string = True
            if self.depth == 1:
                if self.expect not in ("key", "value"):
                    self.error = True
                self.token_start = i
                if self.expect == "value":
                    self.expect = "string_value"
                    self._start_value(i, is_string=True)
            return
        if char in "{[":
            self.depth += 1
            if self.depth == 2 and self.expect == "value":
                self.token_start = i
                self.expect = "nested_value"
                self._start_value(i, is_string=False)
            return
        if char in "}]":
            if self.depth == 1 and self.expect == "scalar":
                self._end_value(i)
            self.depth -= 1
            if self.depth == 1 and self.expect == "nested_value":
                self._end_value(i + 1)
            elif self.depth == 0:
                self.done = True
            return
        if self.depth != 1:
            return
        if char == ":" and self.expect == "colon":
            self.expect = "value"
        elif char == ",":
            if self.expect == "scalar":
                self._end_value(i)
            self.expect = "key"
        elif self.expect == "value":
            self.token_start = i
            self.expect = "scalar"
            self._start_value(i, is_string=False)
        elif self.expect != "scalar":
            self.error = True

    def _start_value(self, i: int, is_string: bool) -> None:
        if self.key in ARGUMENT_KEYS:
            self.args_start = i
            self.args_is_string = is_string


class _CallStream:
    """One call being streamed: emits its header when the name is known, then argument text."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.id = new_call_id()
        self.scanner = _CallScanner()
        self.header_sent = False
        self.args_sent = 0  # characters of the arguments text handed out
        self.arguments = ""  # all handed out

    def deltas(self) -> list[ToolCallDelta]:
        scanner = self.scanner
        out: list[ToolCallDelta] = []
        if not self.header_sent and scanner.name is not None:
            self.header_sent = True
            out.append(ToolCallDelta(self.index, self.id, scanner.name))
        if not self.header_sent or scanner.args_start is None:
            return out
        if scanner.args_is_string:  # arguments sent as a JSON string: decode it once complete
            if scanner.args_end is not None and not self.args_sent:
                raw = scanner.text[scanner.args_start : scanner.args_end]
                piece = json.loads(raw) if raw.startswith('"') else raw
                self.args_sent = len(raw)
                self._add(out, piece)
            return out
        end = len(scanner.text) if scanner.args_end is None else scanner.args_end
        piece = scanner.text[scanner.args_start + self.args_sent : end]
        self.args_sent += len(piece)
        self._add(out, piece)
        return out

    def finish(self) -> list[ToolCallDelta]:
        """At the end of the call object: a call without arguments gets `{}`."""
        out = self.deltas()
        if self.header_sent and self.scanner.args_start is None and not self.arguments:
            self._add(out, "{}")
        return out

    def _add(self, out: list[ToolCallDelta], piece: str) -> None:
        if not piece:
            return
        self.arguments += piece
        if out and out[-1].index == self.index:
            out[-1].arguments += piece
        else:
            out.append(ToolCallDelta(self.index, arguments=piece))

    def result(self) -> ToolCall | None:
        """The finished call, if it is a complete object with a name and object arguments."""
        try:
            whole = json.loads(self.scanner.text)
            arguments = json.loads(self.arguments)
        except json.JSONDecodeError:
            return None
        if not (isinstance(whole, dict) and self.scanner.name and isinstance(arguments, dict)):
            return None
        return ToolCall(self.id, self.scanner.name, self.arguments)


def _held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker` (kept until known)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolParser(ABC):
    """Streaming: `feed` each new piece of text, then `finish`; or `parse` a whole output."""

    name: ClassVar[str]
    arguments_key: ClassVar[str]  # what the family calls a call's arguments
    call_opening: ClassVar[str] = ""  # the text before a call's JSON

    def __init__(self) -> None:
        self.calls: list[_CallStream] = []
        self.pending = ""  # text received but not yet handed out

    @abstractmethod
    def feed(self, text: str) -> ParsedDelta: ...

    @property
    def called(self) -> bool:
        """Whether a call has been streamed (its name sent) so far."""
        return any(call.header_sent for call in self.calls)

    @abstractmethod
    def finish(self) -> ParsedDelta: ...

    @classmethod
    def parse(cls, text: str) -> ParsedOutput:
        """Content and calls of a whole output; if a call is malformed, it is all content."""
        parser = cls()
        content = parser.feed(text).content + parser.finish().content
        calls = [c.result() for c in parser.calls]
        if any(c is None for c in calls):
            return ParsedOutput(text, [])
        return ParsedOutput(content.strip() or None, calls)

    @classmethod
    @abstractmethod
    def call_grammar(cls, call_json: str, parallel: bool) -> str:
        """A Lark grammar of one call (or several, if `parallel`), `call_json` one call."""

    @classmethod
    def grammar(
        cls, tools: Sequence[Any], function_name: str | None = None, parallel: bool = True
    ) -> StructuredOutputsParams:
        """The grammar for `tool_choice` "required" (any of `tools`, one call or, `parallel`,
        several) or a named function (exactly one call of it). `tools`: objects with `name` and
        `parameters` (a JSON schema; None: any object), like OpenAI's function definitions."""
        if function_name is not None:
            tools = [t for t in tools if t.name == function_name]
            if not tools:
                raise ValueError(f"tool_choice names {function_name!r}, which is not in tools")
            parallel = False
        if not tools:
            raise ValueError("tool_choice needs at least one tool")
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool.name},
                    cls.arguments_key: tool.parameters or {"type": "object"},
                },
                "required": ["name", cls.arguments_key],
                "additionalProperties": False,
            }
            for tool in tools
        ]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        call_json = json.dumps({**schema, "x-guidance": CALL_JSON_FORMAT})
        return StructuredOutputsParams(grammar=cls.call_grammar(call_json, parallel))

    def _scan(self, text: str, out: ParsedDelta) -> tuple[str, bool]:
        """Feed the current call, adding its deltas to `out`; returns the text after the call
        and whether it is still a call. Text that turns out not to be a call (no name, not an
        object) before anything of it was sent is content."""
        call = self.calls[-1]
        rest = call.scanner.feed(text)
        scanner = call.scanner
        if not call.header_sent and (scanner.error or (scanner.done and scanner.name is None)):
            self.calls.pop()
            out.content += self.call_opening + scanner.text + rest
            return "", False
        if scanner.error:  # a broken call already under way: the rest is content
            out.content += rest
            return "", False
        out.tool_calls += call.finish() if scanner.done else call.deltas()
        return rest, True


class HermesToolParser(ToolParser):
    name = "hermes"
    arguments_key = "arguments"
    START, END = "<tool_call>", "</tool_call>"
    call_opening = START

    def __init__(self) -> None:
        super().__init__()
        self.state = "content"  # content, call, after_call

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        text = self.pending + text
        self.pending = ""
        while text:
            if self.state == "content":
                start = text.find(self.START)
                if start < 0:
                    keep = _held_back(text, self.START)
                    out.content += text[: len(text) - keep]
                    self.pending = text[len(text) - keep :]
                    return out
                out.content += text[:start]
                text = text[start + len(self.START) :].lstrip()
                self.calls.append(_CallStream(len(self.calls)))
                self.state = "call"
            elif self.state == "call":
                if not self.calls[-1].scanner.text:
                    text = text.lstrip()
                    if not text:
                        return out
                text, is_call = self._scan(text, out)
                if not is_call:
                    self.state = "content"
                elif self.calls[-1].scanner.done:
                    self.state = "after_call"
            else:  # after_call: the closing tag, then content (or the next call)
                stripped = text.lstrip()
                if not stripped or (self.END.startswith(stripped) and stripped != self.END):
                    self.pending = text
                    return out
                text = stripped[len(self.END) :] if stripped.startswith(self.END) else stripped
                self.state = "content"
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        if self.state == "content":
            out.content, self.pending = self.pending, ""
        return out

    @classmethod
    def call_grammar(cls, call_json: str, parallel: bool) -> str:
        repeat = ' ("\\n" call)*' if parallel else ""
        return f'start: call{repeat}\ncall: "<tool_call>\\n" %json {call_json} "\\n</tool_call>"\n'


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    arguments_key = "parameters"
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self.state = "start"  # start, call, between, content

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        text = self.pending + text
        self.pending = ""
        while text:
            if self.state == "start":  # calls only if the output begins with one
                head = text.lstrip()
                if head.startswith(self.PYTHON_TAG):
                    head = head[len(self.PYTHON_TAG) :].lstrip()
                elif not head or self.PYTHON_TAG.startswith(head):
                    self.pending = text
                    return out
                if not head:
                    self.pending = ""
                    return out
                self.state = "call" if head.startswith("{") else "content"
                text = head if self.state == "call" else text
                if self.state == "call":
                    self.calls.append(_CallStream(len(self.calls)))
            elif self.state == "call":
                text, is_call = self._scan(text, out)
                if not is_call:
                    self.state = "content"
                elif self.calls[-1].scanner.done:
                    self.state = "between"
            elif self.state == "between":  # `;` and whitespace, then another call
                head = text.lstrip().lstrip(";").lstrip()
                if not head:
                    return out
                if head.startswith("{"):
                    self.calls.append(_CallStream(len(self.calls)))
                    self.state, text = "call", head
                else:
                    self.state, text = "content", head
            else:
                out.content += text
                return out
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        if self.state in ("start", "content"):
            out.content, self.pending = self.pending, ""
        return out

    @classmethod
    def call_grammar(cls, call_json: str, parallel: bool) -> str:
        repeat = ' ("; " call)*' if parallel else ""
        return f"start: call{repeat}\ncall: %json {call_json}\n"


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser)
}
HERMES_MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")


def tool_parser_for(chat_template: str | None, model_type: str | None = None) -> type[ToolParser]:
    """The parser for a model, from how its chat template shows tool calls (or its type)."""
    template = chat_template or ""
    if HermesToolParser.START in template or model_type in HERMES_MODEL_TYPES:
        return HermesToolParser
    if Llama3JsonToolParser.PYTHON_TAG in template or '"parameters"' in template:
        return Llama3JsonToolParser
    return HermesToolParser
