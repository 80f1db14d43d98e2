"""Record formats: a raw record (a dict) -> one of a few typed examples.

A record that does not fit its format raises `BadRecordError` with a short reason; the loader
counts reasons and reports the first few with their `file:line`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class BadRecordError(ValueError):
    """The record does not fit its format; the message is the reason."""


@dataclass(frozen=True)
class Conversation:
    """Chat turns (role, content, and for tool use `tool_calls` / `name`); the loss covers assistant turns."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    """Tool (function) schemas offered to the model, passed to the chat template."""
    loss_weights: tuple[float | None, ...] = ()
    """Per message, the record's `loss_weight` (0: not trained, 1: trained; None: not given); empty when no
    message gives one. Kept beside the messages so chat templates never see it."""


@dataclass(frozen=True)
class Completion:
    """Raw prompt and completion, no chat template; the loss covers the completion and EOS."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class PlainText:
    """Continued pretraining: the loss covers every token."""

    text: str


@dataclass(frozen=True)
class Labeled:
    """Sequence classification: a text (and optional second text) with a class."""

    text: str
    text_pair: str | None
    label: int | str


@dataclass(frozen=True)
class TaggedTokens:
    """Token classification: words and one tag per word (a name like "B-PER", or an id)."""

    tokens: list[str]
    tags: list[str] | list[int]


@dataclass(frozen=True)
class Extractive:
    """Extractive QA: a question about a context; answers as (text, character start) in the context; none:
    unanswerable."""

    context: str
    question: str
    answers: tuple[tuple[str, int], ...]
    id: str | None = None


@dataclass(frozen=True)
class Pair:
    """Text to text (translation, summarization): the model reads `source` (task prefix already prepended) and
    learns `target`."""

    source: str
    target: str


Example = Conversation | Completion | PlainText | Labeled | TaggedTokens | Extractive | Pair

CONVERSATION_FORMATS = ("alpaca", "messages", "sharegpt")
"""Formats read as a Conversation: rendered with a chat template, which the exported tokenizer then carries."""


def _field(record: Mapping[str, Any], columns: Mapping[str, str], name: str, *, required: bool = True,
           kind: type | tuple[type, ...] = str) -> Any:
    key = columns.get(name, name)
    if key not in record or record[key] is None:
        if required:
            raise BadRecordError(f"missing field {key!r}")
        return None
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, kind):  # a bool is never a text, id or list
        raise BadRecordError(f"field {key!r} should be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "text", "int": "an integer", "list": "a list"}.get(k.__name__, k.__name__) for k in kinds)


def _nonempty(text: str, what: str) -> str:
    if not text.strip():
        raise BadRecordError(f"empty {what}")
    if "\ufffd" in text:
        raise BadRecordError(f"undecodable bytes in {what}")
    return text


def parse_alpaca(record: Mapping[str, Any], columns: Mapping[str, str]) -> Conversation:
    instruction = _field(record, columns, "instruction")
    extra = _field(record, columns, "input", required=False) or ""
    output = _nonempty(_field(record, columns, "output"), "output")
    system = _field(record, columns, "system", required=False)
    history = _field(record, columns, "history", required=False, kind=list) or []
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system else []
    for turn in history:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise BadRecordError("history turns should be [prompt, response] pairs of text")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages += [{"role": "user", "content": _nonempty(user, "instruction")}, {"role": "assistant", "content": output}]
    return Conversation(messages)


_ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}


def _check_turns(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 loss_weights: list[float | None] | None = None) -> Conversation:
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecordError("no assistant turn")
    for m in messages:
        if m["role"] == "assistant" and not m.get("tool_calls"):
            _nonempty(m["content"], "assistant turn")
        elif m["content"]:
            _nonempty(m["content"], f"{m['role']} turn")
    weights = tuple(loss_weights) if loss_weights and any(w is not None for w in loss_weights) else ()
    return Conversation(messages, tools, weights)


def _loss_weight(turn: Mapping[str, Any], role: str) -> float | None:
    """A message's `loss_weight` (LLaMA-Factory): 0 leaves the turn untrained, 1 trains it. Fractional
    weights would need a weighted loss, which bigsft does not have: such a record is refused, not rounded."""
    weight = turn.get("loss_weight")
    if weight is None:
        return None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise BadRecordError(f"{role} message with loss_weight {weight!r}: only 0 (not trained) or 1 (trained) "
                             "is supported")
    return float(weight)


def _content_parts(parts: list[Any], role: str) -> tuple[str, str, list[dict[str, Any]]]:
    """Text, reasoning and tool calls from content parts: OpenAI's {"type": "text", "text": ...} and
    LLaMA-Factory v1's {"type": "text" | "reasoning" | "tool_call", "value": ...}. Other parts (images)
    carry no text and are left out."""
    text, reasoning, calls = [], [], []
    for part in parts:
        if not isinstance(part, Mapping):
            raise BadRecordError(f"{role} message content parts should be objects")
        kind = part.get("type")
        value = part["text"] if isinstance(part.get("text"), str) else part.get("value")
        if kind not in ("text", "reasoning", "tool_call", "tool_calls"):
            continue
        if not isinstance(value, str):
            raise BadRecordError(f"a {kind} part of a {role} message has no text (no 'text' or 'value' string)")
        if kind == "text":
            text.append(value)
        elif kind == "reasoning":
            reasoning.append(value)
        else:
            calls += _tool_call(value)
    return "".join(text), "".join(reasoning), calls


def _tools(record: Mapping[str, Any], columns: Mapping[str, str]) -> list[dict[str, Any]] | None:
    """Tool schemas: a list, or a JSON string of one (as glaive / LLaMA-Factory data ship them)."""
    tools = _field(record, columns, "tools", required=False, kind=(str, list))
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise BadRecordError("tools is not valid JSON") from None
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRecordError("tools should be a list of objects")
    # Templates expect OpenAI's {"type": "function", "function": {...}} wrapping.
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


def _tool_call(text: str) -> list[dict[str, Any]]:
    """A sharegpt `function_call` turn ({"name": ..., "arguments": {...}}) as OpenAI tool_calls."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        raise BadRecordError("function_call turn is not valid JSON") from None
    calls = call if isinstance(call, list) else [call]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise BadRecordError("function_call turn needs a name")
    out = []
    for c in calls:
        arguments = c.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise BadRecordError("function_call arguments are not valid JSON") from None
        out.append({"type": "function", "function": {"name": c["name"], "arguments": arguments}})
    return out


def parse_messages(record: Mapping[str, Any], columns: Mapping[str, str]) -> Conversation:
    turns = _field(record, columns, "messages", kind=list)
    messages, weights = [], []
    for turn in turns:
        if not isinstance(turn, Mapping):
            raise BadRecordError("a message should be an object with role and content")
        role = turn.get("role")
        if role not in _ROLES:
            raise BadRecordError(f"unknown role {role!r}")
        content, reasoning, part_calls = turn.get("content"), turn.get("reasoning_content"), []
        if isinstance(content, list):
            content, part_reasoning, part_calls = _content_parts(content, role)
            reasoning = reasoning or part_reasoning or None
        if content is None and (turn.get("tool_calls") or part_calls or role == "tool"):
            content = ""
        if not isinstance(content, str):
            raise BadRecordError(f"{role} message content should be text")
        message: dict[str, Any] = {"role": role, "content": content}
        if reasoning:
            if role != "assistant" or not isinstance(reasoning, str):
                raise BadRecordError(f"reasoning_content belongs in assistant messages, as text (got it on a {role} "
                                     "message)")
            message["reasoning_content"] = reasoning
        if part_calls:
            if role != "assistant":
                raise BadRecordError("tool_call parts belong in assistant messages")
            message["tool_calls"] = part_calls
        if turn.get("tool_calls"):
            if role != "assistant" or not isinstance(turn["tool_calls"], list):
                raise BadRecordError("tool_calls belong in assistant messages, as a list")
            calls = []
            for call in turn["tool_calls"]:
                if not (isinstance(call, Mapping) and isinstance(call.get("function"), Mapping)):
                    raise BadRecordError("a tool call needs a function object")
                function = {**call["function"], "arguments": _arguments(call["function"].get("arguments", {}))}
                calls.append({**call, "function": function})
            message["tool_calls"] = calls
        for key in ("name", "tool_call_id"):
            if isinstance(turn.get(key), str):
                message[key] = turn[key]
        messages.append(message)
        weights.append(_loss_weight(turn, role))
    return _check_turns(messages, _tools(record, columns), weights)


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            raise BadRecordError("tool call arguments are not valid JSON") from None
    return arguments


def parse_sharegpt(record: Mapping[str, Any], columns: Mapping[str, str]) -> Conversation:
    turns = _field(record, columns, "conversations", kind=list)
    system = _field(record, columns, "system", required=False)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    weights: list[float | None] = [None] * len(messages)
    for turn in turns:
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise BadRecordError("a turn should be an object with from and value")
        role = _SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise BadRecordError(f"unknown role {turn.get('from')!r}")
        if turn.get("from") == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _tool_call(turn["value"])})
        else:
            messages.append({"role": role, "content": turn["value"]})
        weights.append(_loss_weight(turn, role))
    return _check_turns(messages, _tools(record, columns), weights)


def parse_prompt_completion(record: Mapping[str, Any], columns: Mapping[str, str]) -> Completion:
    prompt = _field(record, columns, "prompt")
    completion = _nonempty(_field(record, columns, "completion"), "completion")
    return Completion(prompt, completion)


def parse_text(record: Mapping[str, Any], columns: Mapping[str, str]) -> PlainText:
    return PlainText(_nonempty(_field(record, columns, "text"), "text"))


def parse_classification(record: Mapping[str, Any], columns: Mapping[str, str]) -> Labeled:
    text = _nonempty(_field(record, columns, "text"), "text")
    pair = _field(record, columns, "text_pair", required=False)
    label = _field(record, columns, "label", kind=(int, str))
    if isinstance(label, str):
        label = label.strip()
        if label.lstrip("-").isdigit():  # CSV/TSV cells are text: "1" is the class id 1
            label = int(label)
        elif not label:
            raise BadRecordError("empty label")
    return Labeled(text, pair, label)


def parse_tagged(record: Mapping[str, Any], columns: Mapping[str, str]) -> TaggedTokens:
    """`tokens` and one tag per token (`conll` sentences come as the same two fields)."""
    tokens = _field(record, columns, "tokens", kind=list)
    tags = _field(record, columns, "tags", kind=list)
    if not tokens:
        raise BadRecordError("no tokens")
    for i, token in enumerate(tokens):
        if not isinstance(token, str):
            raise BadRecordError(f"token {i} is {type(token).__name__}, not text")
        if not token.strip():
            raise BadRecordError(f"token {i} is empty")
    if len(tags) != len(tokens):
        raise BadRecordError(f"{len(tags)} tags for {len(tokens)} tokens")
    if all(isinstance(t, str) for t in tags):
        if not all(t.strip() for t in tags):
            raise BadRecordError("empty tag")
        return TaggedTokens(list(tokens), [t.strip() for t in tags])
    if all(isinstance(t, int) and not isinstance(t, bool) for t in tags):
        if min(tags) < 0:
            raise BadRecordError(f"negative tag id {min(tags)}")
        return TaggedTokens(list(tokens), list(tags))
    raise BadRecordError("mixed tag kinds (tags should be all names or all integer ids)")


ANSWER_SHIFTS = (0, -1, 1, -2, 2)
"""Character shifts tried when an answer is not where `answer_start` says: real data sets (CMRC, some SQuAD
conversions) count a character or two differently, e.g. around whitespace or a BOM."""


def _answer_spans(raw: Any) -> list[tuple[Any, Any]]:
    """(text, answer_start) pairs from HF's {text: [...], answer_start: [...]} or a list of {text, answer_start}."""
    if isinstance(raw, Mapping):
        texts, starts = raw.get("text", []), raw.get("answer_start", [])
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise BadRecordError("answers should have as many text as answer_start entries")
        return list(zip(texts, starts))
    if not all(isinstance(a, Mapping) for a in raw):
        raise BadRecordError("answers should be objects with text and answer_start")
    return [(a.get("text"), a.get("answer_start")) for a in raw]


def _locate(context: str, text: Any, start: Any) -> tuple[str, int]:
    if not isinstance(text, str) or not text.strip():
        raise BadRecordError("an answer has no text")
    if isinstance(start, str) and start.strip().isdigit():
        start = int(start)
    if isinstance(start, bool) or not isinstance(start, int):
        raise BadRecordError(f"answer {text!r} has no integer answer_start")
    stripped, lead = text.strip(), len(text) - len(text.lstrip())
    for shift in ANSWER_SHIFTS:
        at = start + lead + shift
        if at >= 0 and context[at:at + len(stripped)] == stripped:
            return stripped, at
    raise BadRecordError(f"answer {text!r} is not at character {start} of the context")


def parse_extractive(record: Mapping[str, Any], columns: Mapping[str, str]) -> Extractive:
    """A question, its context and the answer spans. With `is_impossible` true there are no answers (SQuAD
    v2); without the field, no answers means unanswerable too (HF squad_v2), while a question marked
    answerable (every SQuAD v1.1 question) must have one."""
    context = _nonempty(_field(record, columns, "context"), "context")
    question = _nonempty(_field(record, columns, "question"), "question")
    qid = _field(record, columns, "id", required=False, kind=(str, int))
    impossible = record.get(columns.get("is_impossible", "is_impossible"))
    if impossible is not None and not isinstance(impossible, bool):
        raise BadRecordError(f"is_impossible should be true or false, got {impossible!r}")
    qid = None if qid is None else str(qid)
    if impossible:
        return Extractive(context, question, (), qid)
    spans = _answer_spans(_field(record, columns, "answers", required=False, kind=(list, dict)) or [])
    answers = tuple(dict.fromkeys(_locate(context, text, start) for text, start in spans))
    if not answers and impossible is False:
        raise BadRecordError("no answers for an answerable question")
    return Extractive(context, question, answers, qid)


def parse_seq2seq(record: Mapping[str, Any], columns: Mapping[str, str], *, prefix: str = "") -> Pair:
    """`source` (with the source's `prefix` in front) and the `target` the model learns to write."""
    source = _nonempty(_field(record, columns, "source"), "source")
    target = _nonempty(_field(record, columns, "target"), "target")
    return Pair(prefix + source, target)


Parser = Callable[[Mapping[str, Any], Mapping[str, str]], Example]

PARSERS: dict[str, Parser] = {
    "alpaca": parse_alpaca,
    "messages": parse_messages,
    "sharegpt": parse_sharegpt,
    "prompt_completion": parse_prompt_completion,
    "text": parse_text,
    "classification": parse_classification,
    "conll": parse_tagged,
    "tokens": parse_tagged,
    "squad": parse_extractive,
    "seq2seq": parse_seq2seq,
}


def parser_for(source) -> Parser:
    """The parser of a `DataSource`, with its per-source options bound (a seq2seq `prefix`); called like the
    entries of PARSERS, as (record fields, columns)."""
    if source.format == "seq2seq" and source.prefix:
        return functools.partial(parse_seq2seq, prefix=source.prefix)
    return PARSERS[source.format]
