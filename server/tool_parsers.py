"""Tool calls in generated text, in vLLM's parser formats (`--tool-call-parser NAME`):

- `hermes`: `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>` blocks; the
  text before the first block is the message content (what vLLM's hermes parser returns).
- `llama3_json`: the whole output is `{"name": "f", "parameters": {...}}` objects (or
  "arguments"), separated by `;`, optionally after `<|python_tag|>`; anything else is content.

Each format also builds the grammar pieces that make a model write its calls that way
(server/tools.py), so forced calls (`tool_choice` required or named) parse by construction.

The arguments are the generated JSON text of the arguments value itself (not re-serialized),
so the stream's argument fragments (ToolCallStream) concatenate to exactly the non-streamed
`arguments`. A call block that is not a JSON object with a string name and an object of
arguments makes the whole output plain content, as vLLM does; a call cut by max_tokens is
content too (a stream may have sent part of it as a call by then)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Protocol

_WS = " \t\r\n"


@dataclass
class ParsedCall:
    name: str | None  # None while a streamed call's name is still being written
    arguments: str  # the arguments' JSON text so far
    complete: bool


@dataclass
class Parsed:
    content: str  # the message text (for a stream in progress: what is safe to send)
    calls: list[ParsedCall] = field(default_factory=list)
    valid: bool = True  # False: a block failed to parse, the whole text is content


def _string_end(text: str, pos: int) -> int | None:
    """End (after the closing quote) of the JSON string starting at text[pos] == '"'."""
    i = pos + 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def _value_end(text: str, pos: int) -> int | None:
    """End of the JSON value starting at `pos`, None while it is unfinished."""
    c = text[pos]
    if c == '"':
        return _string_end(text, pos)
    if c in "{[":
        depth, i = 0, pos
        while i < len(text):
            c = text[i]
            if c == '"':
                end = _string_end(text, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    i = pos  # number or literal: finished once a delimiter follows
    while i < len(text) and text[i] not in ",}]" + _WS:
        i += 1
    return i if i < len(text) else None


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


@dataclass
class _Object:
    """What a scan of a (possibly unfinished) JSON object found: key -> value span
    (end None while unfinished) and where the object closed (None: not yet)."""

    spans: dict[str, tuple[int, int | None]]
    end: int | None
    broken: bool = False  # not a JSON object (as far as it goes)


def scan_object(text: str, pos: int) -> _Object:
    found = _Object({}, None)
    pos = _skip(text, pos)
    if pos >= len(text):
        return found
    if text[pos] != "{":
        found.broken = True
        return found
    pos += 1
    while True:
        pos = _skip(text, pos)
        if pos >= len(text):
            return found
        if text[pos] == "}":
            found.end = pos + 1
            return found
        if text[pos] != '"':
            found.broken = True
            return found
        key_end = _string_end(text, pos)
        if key_end is None:
            return found
        key = json.loads(text[pos:key_end])
        pos = _skip(text, key_end)
        if pos >= len(text):
            return found
        if text[pos] != ":":
            found.broken = True
            return found
        pos = _skip(text, pos + 1)
        if pos >= len(text):
            return found
        end = _value_end(text, pos)
        found.spans[key] = (pos, end)
        if end is None:
            return found
        pos = _skip(text, end)
        if pos >= len(text):
            return found
        if text[pos] == ",":
            pos += 1
        elif text[pos] == "}":
            found.end = pos + 1
            return found
        else:
            found.broken = True
            return found


def _call(text: str, start: int, args_keys: tuple[str, ...]) -> tuple[ParsedCall | None, int | None, bool]:
    """The call object at `start`: (call so far, end of the object or None, broken)."""
    obj = scan_object(text, start)
    if obj.broken:
        return None, None, True
    name = None
    span = obj.spans.get("name")
    if span is not None and span[1] is not None:
        value = json.loads(text[span[0] : span[1]])
        if not isinstance(value, str):
            return None, None, True
        name = value
    args = ""
    for key in args_keys:
        if key in obj.spans:
            a, b = obj.spans[key]
            args = text[a : len(text) if b is None else b]
            if text[a] != "{" or (b is not None and not isinstance(json.loads(text[a:b]), dict)):
                return None, None, True
            break
    if obj.end is not None:  # finished: exactly a name and one object of arguments
        if name is None or set(obj.spans) - {"name", *args_keys} or not any(k in obj.spans for k in args_keys):
            return None, None, True
    return ParsedCall(name, args, obj.end is not None), obj.end, False


def _held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ToolFormat(Protocol):
    """One way of writing tool calls: how to parse them and the grammar pieces that write them."""

    name: str
    trigger: str  # the text that opens a call (the grammar constrains what follows)
    separator: str  # between parallel calls

    def parse(self, text: str, final: bool) -> Parsed: ...

    def tag(self, name: str) -> tuple[str, str]:
        """(begin, end) around a call of `name`'s arguments (a JSON object) in the grammar."""
        ...


class HermesFormat:
    name = "hermes"
    trigger = "<tool_call>"
    separator = "\n"
    _END = "</tool_call>"

    def tag(self, name: str) -> tuple[str, str]:
        return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": ', "}\n" + self._END

    def parse(self, text: str, final: bool) -> Parsed:
        first = text.find(self.trigger)
        if first < 0:
            return Parsed(text if final else text[: len(text) - _held_back(text, self.trigger)])
        out = Parsed(text[:first])
        pos = first
        while True:
            body = pos + len(self.trigger)
            close = text.find(self._END, body)
            call, end, broken = _call(text[: len(text) if close < 0 else close], body, ("arguments",))
            if broken or (close >= 0 and (call is None or not call.complete)):
                return Parsed(text, [], valid=False)
            if close < 0:  # unfinished: the call so far
                if final:
                    return Parsed(text, [], valid=False)
                out.calls.append(ParsedCall(call.name, call.arguments, False) if call else ParsedCall(None, "", False))
                return out
            assert call is not None and end is not None
            if text[end:close].strip(_WS):
                return Parsed(text, [], valid=False)
            out.calls.append(call)
            pos = text.find(self.trigger, close + len(self._END))
            if pos < 0:  # text after the last call is dropped (vLLM's hermes parser)
                return out


class Llama3JsonFormat:
    name = "llama3_json"
    trigger = '{"name": '
    separator = "; "
    _TAG = "<|python_tag|>"

    def tag(self, name: str) -> tuple[str, str]:
        return f'{{"name": {json.dumps(name)}, "parameters": ', "}"

    def parse(self, text: str, final: bool) -> Parsed:
        start = _skip(text, 0)
        if text.startswith(self._TAG, start):
            start = _skip(text, start + len(self._TAG))
        elif not final and self._TAG.startswith(text[start:]):
            return Parsed("")  # may still become the python tag
        if start >= len(text):
            return Parsed(text if final else "")
        if text[start] != "{":
            return Parsed(text)
        out = Parsed("")
        pos = start
        while True:
            call, end, broken = _call(text, pos, ("parameters", "arguments"))
            if broken or call is None:
                return Parsed(text, [], valid=False)
            if end is None:
                if final:
                    return Parsed(text, [], valid=False)
                out.calls.append(call)
                return out
            out.calls.append(call)
            pos = _skip(text, end)
            if pos >= len(text):
                return out
            if text[pos] != ";":
                return Parsed(text, [], valid=False)
            pos = _skip(text, pos + 1)
            if pos >= len(text):
                return out


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HermesFormat(), Llama3JsonFormat())}


def tool_format(name: str) -> ToolFormat:
    if name not in FORMATS:
        raise ValueError(f"tool_call_parser must be one of {', '.join(sorted(FORMATS))}, got {name!r}")
    return FORMATS[name]


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def message_calls(parsed: Parsed, ids: list[str], parallel: bool) -> list[dict]:
    """OpenAI's `tool_calls` of a finished parse (one only unless `parallel`)."""
    calls = parsed.calls if parallel else parsed.calls[:1]
    while len(ids) < len(calls):
        ids.append(call_id())
    return [
        {"id": ids[i], "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for i, c in enumerate(calls)
    ]


class ToolCallStream:
    """Deltas for one choice's stream: content as it becomes safe to send (text that may
    start a call is held back), then each call's header (index, id, type, name) once its name
    is written and its argument fragments as they come. The deltas of a finished output add up
    to the non-streamed message (same parse of the same text)."""

    def __init__(self, fmt: ToolFormat, parallel: bool, ids: list[str] | None = None) -> None:
        self.fmt = fmt
        self.parallel = parallel
        self.ids = [] if ids is None else ids  # call ids, appended as calls appear (shared with the caller)
        self._content = 0  # characters of content sent
        self._args: list[int] = []  # per call announced: argument characters sent

    def update(self, text: str, final: bool) -> list[dict]:
        parsed = self.fmt.parse(text, final)
        deltas: list[dict] = []
        if len(parsed.content) > self._content:
            deltas.append({"content": parsed.content[self._content :]})
            self._content = len(parsed.content)
        calls = parsed.calls if self.parallel else parsed.calls[:1]
        for i, call in enumerate(calls):
            if call.name is None:
                break
            if i == len(self._args):
                self.ids.append(call_id())
                self._args.append(0)
                header = {"index": i, "id": self.ids[i], "type": "function"}
                deltas.append({"tool_calls": [{**header, "function": {"name": call.name, "arguments": ""}}]})
            if len(call.arguments) > self._args[i]:
                fragment = call.arguments[self._args[i] :]
                self._args[i] = len(call.arguments)
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": fragment}}]})
        return deltas

    @property
    def called(self) -> bool:
        return bool(self._args)
