"""Examples -> token ids and training targets.

For causal LMs a sample carries `targets` already shifted: targets[t] is the token position t must
predict, or -100 where no loss applies (prompts, system text, tool results, template scaffolding).
Shifting per sample, before any batching, keeps a sample's last token from ever predicting the
next sample's first one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bigsft.data.formats import BadRecordError, Completion, Conversation, Example, Labeled, PlainText

IGNORE = -100

# ChatML-style, for tokenizers without a chat template. Assistant turns end with the tokenizer's EOS
# so that a model trained on it learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True, slots=True)
class Sample:
    input_ids: list[int]
    targets: list[int] | int
    """Per-position next-token targets (-100: no loss) for causal LMs; a class id for classifiers."""
    token_type_ids: list[int] | None = None

    @property
    def num_targets(self) -> int:
        if isinstance(self.targets, int):
            return 1
        return sum(t != IGNORE for t in self.targets)


class SampleBuilder:
    """Turns examples into samples for one tokenizer and task; raises BadRecordError when it cannot."""

    def __init__(self, tokenizer, *, max_length: int, system_prompt: str | None = None,
                 chat_template: str | None = None, label2id: Mapping[str, int] | None = None,
                 num_labels: int | None = None):
        self.tok = tokenizer
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        self.label2id = dict(label2id or {})
        self.num_labels = num_labels

    def __call__(self, example: Example) -> Sample:
        if isinstance(example, Conversation):
            return self._conversation(example)
        if isinstance(example, Completion):
            return self._completion(example)
        if isinstance(example, PlainText):
            ids = self._encode(example.text, special=True) + self._eos()
            return self._causal(ids, [True] * len(ids))
        if isinstance(example, Labeled):
            return self._labeled(example)
        raise TypeError(f"unknown example type {type(example).__name__}")

    # -- causal LM ----------------------------------------------------------------------------------

    def _encode(self, text: str, *, special: bool = False) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def _eos(self) -> list[int]:
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []

    def _causal(self, ids: list[int], trained: list[bool]) -> Sample:
        if len(ids) > self.max_length:
            ids, trained = ids[: self.max_length], trained[: self.max_length]
        # Position t predicts token t+1; the target is kept only where token t+1 is trained.
        targets = [ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
        if all(t == IGNORE for t in targets):
            raise BadRecordError(f"no trained token within data.max_length={self.max_length}")
        return Sample(ids, targets)

    def _completion(self, ex: Completion) -> Sample:
        prompt = self._encode(ex.prompt, special=True)
        answer = self._encode(ex.completion) + self._eos()
        return self._causal(prompt + answer, [False] * len(prompt) + [True] * len(answer))

    def _render(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def _conversation(self, ex: Conversation) -> Sample:
        messages = ex.messages
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        try:
            text = self._render(messages, generation_prompt=False)
            spans = []  # character spans of assistant turns, scaffolding after the content included
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                before = self._render(messages[:i], generation_prompt=True)
                through = self._render(messages[: i + 1], generation_prompt=False)
                if not (text.startswith(before) and text.startswith(through)):
                    raise BadRecordError("chat template renders earlier turns differently once later turns exist")
                spans.append((len(before), len(through.rstrip())))
        except BadRecordError:
            raise
        except Exception as e:  # a template that rejects this conversation (role order, ...)
            raise BadRecordError(f"chat template failed: {str(e).splitlines()[0][:120]}") from None
        ids, trained = self._tokenize_spans(text, spans)
        return self._causal(ids, trained)

    def _tokenize_spans(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            trained = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]
            return enc["input_ids"], trained
        # Slow tokenizers have no offsets: tokenize prompt and response pieces separately.
        ids: list[int] = []
        trained: list[bool] = []
        pos = 0
        for s, e in spans:
            for piece, is_trained in ((text[pos:s], False), (text[s:e], True)):
                if piece:
                    piece_ids = self._encode(piece)
                    ids += piece_ids
                    trained += [is_trained] * len(piece_ids)
            pos = e
        if pos < len(text):
            rest = self._encode(text[pos:])
            ids += rest
            trained += [False] * len(rest)
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
        return Sample(enc["input_ids"], label, enc.get("token_type_ids"))
