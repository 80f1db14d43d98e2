"""Examples -> token ids and training targets.

For causal LMs a sample carries `targets` already shifted: targets[t] is the token position t must
predict, or -100 where no loss applies (prompts, system text, tool results, template scaffolding).
Shifting per sample, before any packing, keeps a sample's last token from ever predicting the next
sample's first one.

Conversations are rendered with the tokenizer's chat template (or `data.chat_template`, or a
ChatML-style default); the trained spans are found by rendering the conversation up to each
assistant turn, so any template that renders earlier turns the same way once later ones exist works.
"""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from bigsft.config import TrainOn
from bigsft.data.formats import (
    BadRecordError,
    Completion,
    Conversation,
    Example,
    Extractive,
    Labeled,
    Pair,
    PlainText,
    TaggedTokens,
)

IGNORE = -100
TRAIN_ON = typing.get_args(TrainOn)

# ChatML-style, for tokenizers without a chat template. Assistant turns end with the tokenizer's EOS
# so that a model trained on it learns to stop; tool schemas go into the system turn, tool calls
# are JSON between <tool_call> tags and an assistant's reasoning_content comes first, in <think> tags.
DEFAULT_CHAT_TEMPLATE = (
    "{%- set ns = namespace(messages=messages) -%}"
    "{%- if tools -%}"
    "{{ '<|im_start|>system\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] + '\n\n' }}{%- set ns.messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{ 'You may call these tools:\n' }}"
    "{%- for tool in tools -%}{{ tool | tojson }}{{ '\n' }}{%- endfor -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in ns.messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['reasoning_content'] is defined and message['reasoning_content'] -%}"
    "{{ '<think>\n' + message['reasoning_content'].strip() + '\n</think>\n\n' }}"
    "{%- endif -%}"
    "{{ message['content'] }}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{{ '<tool_call>\n' + (call['function'] | tojson) + '\n</tool_call>' }}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>' }}"
    "{%- if message['role'] == 'assistant' and eos_token -%}{{ eos_token }}{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


@dataclass(frozen=True, slots=True)
class Sample:
    input_ids: list[int]
    targets: list[int] | int
    """Per-position next-token targets (-100: no loss) for causal LMs, per-token tags for taggers (-100 where
    no word starts); a class id for classifiers; the answer's start token for extractive QA."""
    token_type_ids: list[int] | None = None
    truncated: bool = False
    span_end: int | None = None
    """Extractive QA: the answer's end token (start and end 0: no answer in this window)."""
    meta: dict | None = None
    """Extractive QA eval windows: what maps a predicted span back to text (example key, character offsets
    of the context tokens, the context and the reference answers)."""
    decoder_input_ids: list[int] | None = None
    """seq2seq: the decoder's inputs, the targets shifted right behind the decoder start token (`targets[t]` is
    what decoder position t predicts; `input_ids` is the encoder's source)."""

    @property
    def num_targets(self) -> int:
        if isinstance(self.targets, int):
            return 1
        return sum(t != IGNORE for t in self.targets)

    def to_state(self) -> list:
        return [self.input_ids, self.targets, self.token_type_ids, self.truncated, self.span_end, self.meta,
                self.decoder_input_ids]

    @classmethod
    def from_state(cls, state: list) -> Sample:
        return cls(*state)


class SampleBuilder:
    """Turns examples into samples for one tokenizer and task; raises BadRecordError when it cannot."""

    def __init__(self, tokenizer, *, max_length: int, system_prompt: str | None = None,
                 chat_template: str | None = None, train_on: str = "assistant", truncation: str = "truncate",
                 label2id: Mapping[str, int] | None = None, num_labels: int | None = None,
                 subtoken_labels: str = "first", doc_stride: int = 128, max_target_length: int | None = None,
                 decoder_start: int | None = None, target_end: int | None = None):
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}")
        self.tok = tokenizer
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        self.train_on = train_on
        self.truncation = truncation
        self.label2id = dict(label2id or {})
        self.num_labels = num_labels
        self.subtoken_labels = subtoken_labels
        self.doc_stride = doc_stride
        self.max_target_length = max_target_length or max_length
        self.decoder_start = decoder_start
        self.target_end = target_end
        self.with_meta = False
        # subtoken_labels "all": a word's later sub-tokens continue its entity (B-X -> I-X, when I-X is a tag).
        names = {v: k for k, v in self.label2id.items()}
        self.continuation = {i: self.label2id.get("I-" + names[i][2:], i) if names[i].startswith("B-") else i
                             for i in names}

    def for_eval(self) -> SampleBuilder:
        """The builder of eval samples: tagging scores each word at its first sub-token only; QA windows carry
        what maps a span back to the context's text."""
        other = copy.copy(self)
        other.subtoken_labels = "first"
        other.with_meta = True
        return other

    def with_own_tokenizer(self) -> SampleBuilder:
        """The same builder over a copy of the tokenizer: for a thread that tokenizes while another uses the
        original (a fast tokenizer's settings are shared state; concurrent calls can collide on them)."""
        other = copy.copy(self)
        other.tok = copy.deepcopy(self.tok)
        return other

    def __call__(self, example: Example) -> Sample:
        out = self.build_many([example])[0]
        if isinstance(out, BadRecordError):
            raise out
        return out

    def build_many(self, examples: list[Example]) -> list[Sample | BadRecordError]:
        """Samples for a chunk of examples (BadRecordError in place of the ones that cannot be used).

        Conversations are tokenized in one batched call: the fast tokenizer splits a batch over threads.
        """
        out: list[Sample | BadRecordError | None] = [None] * len(examples)
        rendered: list[tuple[int, str, list[tuple[int, int]]]] = []
        for i, example in enumerate(examples):
            try:
                if isinstance(example, Conversation):
                    rendered.append((i, *self._render_spans(example)))
                else:
                    out[i] = self._one(example)
            except BadRecordError as e:
                out[i] = e
        if rendered:
            for (i, _, _), (ids, trained) in zip(rendered, self._tokenize_spans([(t, sp) for _, t, sp in rendered])):
                try:
                    out[i] = self._causal(ids, trained)
                except BadRecordError as e:
                    out[i] = e
        return out

    def _one(self, example: Example) -> Sample:
        if isinstance(example, Completion):
            return self._completion(example)
        if isinstance(example, PlainText):
            ids = self._encode(example.text, special=True) + self._eos()
            return self._causal(ids, [True] * len(ids))
        if isinstance(example, Labeled):
            return self._labeled(example)
        if isinstance(example, TaggedTokens):
            return self._tagged(example)
        if isinstance(example, Extractive):
            return self._windows(example)
        if isinstance(example, Pair):
            return self._pair(example)
        raise TypeError(f"unknown example type {type(example).__name__}")

    # -- causal LM ----------------------------------------------------------------------------------

    def _encode(self, text: str, *, special: bool = False) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def _eos(self) -> list[int]:
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []

    def _causal(self, ids: list[int], trained: list[bool]) -> Sample:
        truncated = len(ids) > self.max_length
        if truncated:
            if self.truncation == "drop":
                raise BadRecordError(f"longer than data.max_length={self.max_length} (data.truncation: drop)")
            ids, trained = ids[: self.max_length], trained[: self.max_length]
        # Position t predicts token t+1; the target is kept only where token t+1 is trained.
        shifted = np.full(len(ids), IGNORE, dtype=np.int64)
        shifted[:-1] = np.where(np.asarray(trained[1:], dtype=bool), np.asarray(ids[1:], dtype=np.int64), IGNORE)
        targets = shifted.tolist()
        if not np.any(shifted != IGNORE):
            if truncated:
                raise BadRecordError(f"prompt fills data.max_length={self.max_length}, no trained token left")
            raise BadRecordError("no trained token")
        return Sample(ids, targets, truncated=truncated)

    def _completion(self, ex: Completion) -> Sample:
        prompt = self._encode(ex.prompt, special=True)
        answer = self._encode(ex.completion) + self._eos()
        return self._causal(prompt + answer, [self.train_on == "all"] * len(prompt) + [True] * len(answer))

    def _render(self, conv: Conversation, upto: int, *, generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(conv.messages[:upto], tools=conv.tools, chat_template=self.chat_template,
                                            tokenize=False, add_generation_prompt=generation_prompt)

    def _with_system_prompt(self, ex: Conversation) -> Conversation:
        if self.system_prompt and ex.messages[0]["role"] != "system":
            return Conversation([{"role": "system", "content": self.system_prompt}, *ex.messages], ex.tools,
                                (None, *ex.loss_weights) if ex.loss_weights else ())
        return ex

    def generation_prompt(self, example: Example) -> tuple[list[int], str]:
        """(prompt ids, reference answer) for generation eval: a conversation up to its last assistant turn
        (rendered with the generation prompt, as training renders it), or a completion's prompt. The
        prompt keeps its last data.max_length tokens. BadRecordError for examples without an answer."""
        if isinstance(example, Completion):
            ids, reference = self._encode(example.prompt, special=True), example.completion
        elif isinstance(example, Conversation):
            ex = self._with_system_prompt(example)
            last = max((i for i, m in enumerate(ex.messages) if m["role"] == "assistant"), default=None)
            if last is None:
                raise BadRecordError("no assistant turn to answer")
            message = ex.messages[last]
            reference = message.get("content") or ""
            if message.get("tool_calls"):
                reference += "".join(json.dumps(call.get("function", call), ensure_ascii=False)
                                     for call in message["tool_calls"])
            try:
                text = self._render(ex, last, generation_prompt=True)
            except Exception as e:  # a template that rejects this conversation
                raise BadRecordError(f"chat template failed: {str(e).splitlines()[0][:120]}") from None
            ids = self._encode(text)
        elif isinstance(example, Pair):
            return self._source(example.source)[0], example.target
        else:
            raise BadRecordError(f"{type(example).__name__} records have no prompt to answer")
        return ids[-self.max_length:], reference

    def _render_spans(self, ex: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans that carry the loss."""
        ex = self._with_system_prompt(ex)
        try:
            text = self._render(ex, len(ex.messages), generation_prompt=False)
            if self.train_on == "all":
                spans = [(0, len(text))]
            else:
                spans = []  # character spans of assistant turns, end-of-turn scaffolding included
                turns = self._trained_turns(ex)
                if self.train_on == "last_assistant":
                    turns = turns[-1:]
                for i in turns:
                    before = self._render(ex, i, generation_prompt=True)
                    through = text if i + 1 == len(ex.messages) else self._render(ex, i + 1, generation_prompt=False)
                    if not (text.startswith(before) and text.startswith(through)):
                        raise BadRecordError("chat template renders earlier turns differently once later turns exist")
                    spans.append((len(before), len(through.rstrip())))
        except BadRecordError:
            raise
        except Exception as e:  # a template that rejects this conversation (role order, ...)
            raise BadRecordError(f"chat template failed: {str(e).splitlines()[0][:120]}") from None
        return text, spans

    @staticmethod
    def _trained_turns(ex: Conversation) -> list[int]:
        """Assistant turns that carry the loss: all but those with `loss_weight: 0`. A weight on any other
        turn asks for training it, which only `data.train_on: all` does (it trains every token anyway)."""
        weights = ex.loss_weights or (None,) * len(ex.messages)
        turns = []
        for i, (m, weight) in enumerate(zip(ex.messages, weights)):
            if m["role"] == "assistant":
                if weight != 0:
                    turns.append(i)
            elif weight:
                raise BadRecordError(f"{m['role']} message with loss_weight {weight:g}: only assistant turns are "
                                     "trained (data.train_on: all trains every turn)")
        if not turns:
            raise BadRecordError("no trained turn (every assistant message has loss_weight 0)")
        return turns

    def _tokenize_spans(self, items: list[tuple[str, list[tuple[int, int]]]]) -> list[tuple[list[int], list[bool]]]:
        """Token ids and per-token trained flags: a token is trained when it overlaps a trained span."""
        if not getattr(self.tok, "is_fast", False):
            return [self._tokenize_pieces(text, spans) for text, spans in items]
        enc = self.tok([text for text, _ in items], add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], items):
            offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            trained = np.zeros(len(ids), dtype=bool)
            for s, e in spans:
                trained |= (offsets[:, 0] < e) & (offsets[:, 1] > s)
            out.append((ids, trained))
        return out

    def _tokenize_pieces(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        # Slow tokenizers have no offsets: tokenize prompt and response pieces separately.
        ids: list[int] = []
        trained: list[bool] = []
        pos = 0
        for s, e in [*spans, (len(text), len(text))]:
            for piece, is_trained in ((text[pos:s], False), (text[s:e], True)):
                if piece:
                    piece_ids = self._encode(piece)
                    ids += piece_ids
                    trained += [is_trained] * len(piece_ids)
            pos = e
        return ids, trained

    # -- classification -----------------------------------------------------------------------------

    def _labeled(self, ex: Labeled) -> Sample:
        if isinstance(ex.label, str):
            if ex.label not in self.label2id:
                raise BadRecordError(f"unknown label {ex.label!r} (known: {', '.join(self.label2id)})")
            label = self.label2id[ex.label]
        else:
            label = ex.label
            if self.num_labels is not None and not 0 <= label < self.num_labels:
                raise BadRecordError(f"label {label} outside 0..{self.num_labels - 1}")
        enc = self.tok(ex.text, ex.text_pair, truncation=True, max_length=self.max_length)
        full = len(self.tok(ex.text, ex.text_pair)["input_ids"]) if len(enc["input_ids"]) == self.max_length else 0
        truncated = full > self.max_length
        if truncated and self.truncation == "drop":
            raise BadRecordError(f"longer than data.max_length={self.max_length} (data.truncation: drop)")
        return Sample(enc["input_ids"], label, enc.get("token_type_ids"), truncated=truncated)


    # -- token classification -----------------------------------------------------------------------

    def _tag_ids(self, tags: list[str] | list[int]) -> list[int]:
        ids = []
        for tag in tags:
            if isinstance(tag, str):
                if tag not in self.label2id:
                    raise BadRecordError(f"unknown tag {tag!r} (known: {', '.join(self.label2id)})")
                ids.append(self.label2id[tag])
            else:
                if self.num_labels is not None and not 0 <= tag < self.num_labels:
                    raise BadRecordError(f"tag {tag} outside 0..{self.num_labels - 1}")
                ids.append(tag)
        return ids

    def _tagged(self, ex: TaggedTokens) -> Sample:
        """Words -> sub-tokens; a word's tag on its first sub-token (and, with subtoken_labels: all, on the rest as
        its continuation); special tokens and the other sub-tokens get no loss."""
        tags = self._tag_ids(ex.tags)
        if len(tags) != len(ex.tokens):
            raise BadRecordError(f"{len(tags)} tags for {len(ex.tokens)} tokens")
        # One token past max_length tells a sentence that does not fit (and never trips the tokenizer's
        # warning about its own model_max_length).
        word_ids, input_ids, token_type_ids = self._split_words(ex.tokens, self.max_length + 1)
        truncated = len(input_ids) > self.max_length
        if truncated:
            if self.truncation == "drop":
                raise BadRecordError(f"longer than data.max_length={self.max_length} (data.truncation: drop)")
            word_ids, input_ids, token_type_ids = self._split_words(ex.tokens, self.max_length)
        targets, previous = [], None
        for word in word_ids:
            if word is None:
                targets.append(IGNORE)
            elif word != previous:
                targets.append(tags[word])
            else:
                targets.append(self.continuation.get(tags[word], tags[word]) if self.subtoken_labels == "all" else IGNORE)
            previous = word
        if all(t == IGNORE for t in targets):
            raise BadRecordError("no word fits data.max_length" if truncated else "no tagged word")
        return Sample(input_ids, targets, token_type_ids, truncated=truncated)

    def _split_words(self, words: list[str], max_length: int):
        enc = self.tok(words, is_split_into_words=True, truncation=True, max_length=max_length)
        if not getattr(self.tok, "is_fast", False):
            raise BadRecordError("token_classification needs a fast tokenizer (word ids)")
        return enc.word_ids(), enc["input_ids"], enc.get("token_type_ids")


    # -- extractive question answering ---------------------------------------------------------------

    def _windows(self, ex: Extractive) -> list[Sample]:
        """The question with the context, in windows of max_length tokens that overlap by doc_stride tokens
        when the context is longer. A window holding the whole (first) answer trains on its start and end
        tokens; every other window, and every window of an unanswerable question, on the first token
        (CLS): "no answer here"."""
        if not getattr(self.tok, "is_fast", False):
            raise BadRecordError("question_answering needs a fast tokenizer (character offsets)")
        question = ex.question.lstrip()
        question_tokens = len(self.tok(question, add_special_tokens=False)["input_ids"])
        room = self.max_length - question_tokens - 4  # the specials of a pair, at most
        if room < 8:
            raise BadRecordError(f"the question ({question_tokens} tokens) leaves no room for the context in "
                                 f"data.max_length={self.max_length}")
        enc = self.tok(question, ex.context, truncation="only_second", max_length=self.max_length,
                       stride=min(self.doc_stride, room - 1), return_overflowing_tokens=True,
                       return_offsets_mapping=True)
        start_char, end_char = (ex.answers[0][1], ex.answers[0][1] + len(ex.answers[0][0])) if ex.answers else (0, 0)
        windows, found = [], not ex.answers
        for w in range(len(enc["input_ids"])):
            sequence = enc.sequence_ids(w)
            offsets = [o if sequence[i] == 1 else None for i, o in enumerate(enc["offset_mapping"][w])]
            start = end = 0
            if ex.answers:
                inside = [i for i, o in enumerate(offsets) if o is not None and o[0] < end_char and o[1] > start_char]
                context = [i for i, o in enumerate(offsets) if o is not None]
                if inside and offsets[context[0]][0] <= start_char and offsets[context[-1]][1] >= end_char:
                    start, end, found = inside[0], inside[-1], True
            meta = None
            if self.with_meta:
                meta = {"key": ex.id or ex.question + "\x1f" + ex.context[:64], "offsets": offsets, "context": ex.context,
                        "answers": [text for text, _ in ex.answers]}
            types = enc["token_type_ids"][w] if "token_type_ids" in enc else None
            windows.append(Sample(enc["input_ids"][w], start, types, span_end=end,
                                  meta=meta))
        if not found:
            raise BadRecordError("the answer falls outside every window (a question too long for data.max_length)")
        return windows


    # -- seq2seq --------------------------------------------------------------------------------------

    def _source(self, text: str) -> tuple[list[int], bool]:
        """The encoder's ids (the tokenizer's special tokens around them), cut to max_length; and whether cut."""
        ids = self.tok(text, truncation=True, max_length=self.max_length + 1)["input_ids"]
        if len(ids) <= self.max_length:
            return ids, False
        if self.truncation == "drop":
            raise BadRecordError(f"source longer than data.max_length={self.max_length} (data.truncation: drop)")
        return self.tok(text, truncation=True, max_length=self.max_length)["input_ids"], True

    def _pair(self, ex: Pair) -> Sample:
        """Source -> encoder ids; target -> the decoder's targets, ending with the end token (appended when the
        tokenizer's own specials do not end with it), without a leading decoder start token (the decoder
        input supplies it), cut to max_target_length with the end token kept."""
        if self.decoder_start is None:
            raise TypeError("a seq2seq SampleBuilder needs decoder_start")
        source, truncated = self._source(ex.source)
        target = self.tok(text_target=ex.target)["input_ids"]
        if target and target[0] == self.decoder_start:
            target = target[1:]
        end = self.target_end
        if end is not None and (not target or target[-1] != end):
            target.append(end)
        if len(target) > self.max_target_length:
            if self.truncation == "drop":
                raise BadRecordError(f"target longer than data.max_target_length={self.max_target_length} "
                                     "(data.truncation: drop)")
            target = target[: self.max_target_length - (end is not None)] + ([end] if end is not None else [])
            truncated = True
        if not target or (end is not None and target == [end]):
            raise BadRecordError("the target has no token")
        return Sample(source, target, truncated=truncated, decoder_input_ids=[self.decoder_start, *target[:-1]])


def keep_chat_template(tokenizer, build: SampleBuilder) -> None:
    """Make the run's tokenizer carry the chat template its conversations are rendered with (data.chat_template,
    the tokenizer's own, or the ChatML-style default), so that every export of it (checkpoints' hf/, final/)
    prompts the model exactly as it was trained."""
    tokenizer.chat_template = build.chat_template


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token ids that end an assistant turn in the tokenizer's chat template, where the marker is one
    added token of the vocabulary (ChatML's <|im_end|>, Llama 3's <|eot_id|>, the EOS). A marker that is
    not a single token (plain text, or a tag the vocabulary splits) cannot be a stop id: none is returned."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    probe = "bigsft end of turn probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                                             tokenize=False)
    except Exception:  # a template that needs more than a plain exchange: nothing to learn from it
        return []
    if probe not in text:
        return []
    tail = text[text.rindex(probe) + len(probe):]
    markers = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    return list(dict.fromkeys(i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in markers))
