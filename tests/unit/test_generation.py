"""Generation eval: prompts from eval records, greedy answers cut at the end of turn, library scores."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from bigsft.config import ConfigError, DataConfig, DataSource, GenerateConfig, ModelConfig
from bigsft.data import setup_data
from bigsft.data.formats import BadRecordError, Completion, Conversation, PlainText
from bigsft.data.tokenize import SampleBuilder
from bigsft.generation import GenerationPrompt, generation_eval, generation_prompts, scores


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.pad_token = t.eos_token
    return t


def test_a_conversation_prompts_up_to_its_last_assistant_turn_as_training_renders_it(tok):
    build = SampleBuilder(tok, max_length=128, system_prompt="Be brief.")
    conv = Conversation([{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5."},
                         {"role": "user", "content": "And 4 and 4?"}, {"role": "assistant", "content": "8."}])
    ids, reference = build.generation_prompt(conv)
    assert reference == "8."
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.") and text.endswith("And 4 and 4?<|im_end|>\n<|im_start|>assistant\n")
    # The prompt is exactly the training sample's tokens before the answer's first trained token.
    sample = build(conv)
    assert sample.input_ids[: len(ids)] == ids
    tool = Conversation([{"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "w", "arguments": {}}}]}])
    assert json.loads(build.generation_prompt(tool)[1]) == {"name": "w", "arguments": {}}


def test_completions_prompt_with_their_prompt_and_other_records_have_none(tok):
    build = SampleBuilder(tok, max_length=6)
    ids, reference = build.generation_prompt(Completion("one two three four five six seven eight", " nine"))
    assert reference == " nine" and len(ids) == 6  # the prompt's last max_length tokens
    assert ids == tok("one two three four five six seven eight")["input_ids"][-6:]
    with pytest.raises(BadRecordError):
        build.generation_prompt(PlainText("no answer here"))
    with pytest.raises(BadRecordError, match="no assistant turn"):
        build.generation_prompt(Conversation([{"role": "user", "content": "hi"}]))


def test_prompts_are_the_first_usable_eval_records_in_set_order(tmp_path, tok):
    a = tmp_path / "a.jsonl"
    a.write_text('{"instruction": "first", "output": "1"}\n{broken\n{"instruction": "second", "output": "2"}\n')
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"instruction": f"b{i}", "output": str(i)}) + "\n" for i in range(5)))
    data = DataConfig(train=[DataSource(path=str(b), format="alpaca")],
                      eval=[DataSource(path=str(a), format="alpaca"), DataSource(path=str(b), format="alpaca", name="bee")],
                      max_bad_fraction=0.5)
    run_data = setup_data(data, ModelConfig(config={"model_type": "llama"}, tokenizer="t"), tok)
    prompts = generation_prompts(data, run_data, 4)
    assert [(p.set, p.reference) for p in prompts] == [("a", "1"), ("a", "2"), ("bee", "0"), ("bee", "1")]
    empty = tmp_path / "plain.jsonl"
    empty.write_text('{"text": "just text"}\n')
    plain = DataConfig(train=[DataSource(path=str(b), format="alpaca")], eval=[DataSource(path=str(empty), format="text")])
    with pytest.raises(ConfigError, match="no eval example has a prompt to answer"):
        generation_prompts(plain, setup_data(plain, ModelConfig(config={"model_type": "llama"}, tokenizer="t"), tok), 4)


def test_scores_come_from_sacrebleu_and_rouge_score():
    refs = ["the cat sat on the mat", "hello world"]
    perfect = {"exact_match": 1.0, "rouge_l": 1.0, "bleu": 100.0}
    # Logged as eval/<metric> (DESIGN's keys) and, the same value, eval/generate/<metric>.
    assert scores(refs, refs, ["exact_match", "rouge_l", "bleu"]) == pytest.approx(
        {f"eval/{p}{k}": v for k, v in perfect.items() for p in ("", "generate/")})
    s = scores(["the cat sat on the", " hello  world "], refs, ["exact_match", "rouge_l", "bleu"])
    assert s["eval/generate/exact_match"] == 0.5  # spacing does not count
    assert scores(["Hello world"], ["hello world"], ["exact_match"])["eval/generate/exact_match"] == 0.0  # case does
    # ROUGE-L F1 of "the cat sat on the" against the reference: LCS 5, precision 1, recall 5/6; then 1.0
    assert s["eval/generate/rouge_l"] == pytest.approx((10 / 11 + 1.0) / 2)
    assert 0 < s["eval/generate/bleu"] < 100
    # Chinese: rouge-score's own split would drop every character; the zh split scores them.
    zh = scores(["北京是首都"], ["中国的首都是北京"], ["rouge_l", "bleu"])
    assert zh["eval/generate/rouge_l"] > 0.3
    assert set(scores(["a"], ["a"], ["bleu"])) == {"eval/bleu", "eval/generate/bleu"}


class Scripted(torch.nn.Module):
    """A "model" whose generate appends a fixed continuation: answers are cut at the first stop token."""

    def __init__(self, continuation: list[int]):
        super().__init__()
        self.continuation = continuation
        self.calls = []

    def generate(self, input_ids, attention_mask, generation_config, synced_gpus):
        self.calls.append((input_ids.tolist(), generation_config.do_sample, synced_gpus))
        return torch.cat([input_ids, torch.tensor([self.continuation])], dim=1)


def test_answers_stop_at_the_eos_and_rows_carry_prompt_reference_output(tok):
    answer = tok("river stone")["input_ids"]
    model = Scripted(answer + [tok.eos_token_id] + tok("garbage")["input_ids"])
    prompts = [GenerationPrompt(tok("Q1")["input_ids"], "river stone", "dev"),
               GenerationPrompt(tok("Q2")["input_ids"], "cloud", "dev")]
    metrics, rows = generation_eval(model, prompts, GenerateConfig(samples=2, max_new_tokens=8), tokenizer=tok,
                                    device="cpu", synced=False)
    assert [r["output"] for r in rows] == ["river stone", "river stone"]
    assert rows[0] == {"set": "dev", "prompt": "Q1", "reference": "river stone", "output": "river stone"}
    assert metrics["eval/generate/exact_match"] == 0.5
    assert [c[1] for c in model.calls] == [False, False]  # greedy


@pytest.mark.parametrize(("data", "hidden"), [
    ({}, ("eval/generate/",)),  # no eval data at all
    ({"eval": [{"path": "dev.jsonl", "format": "alpaca"}]}, ("eval/dev/", "eval/generate/")),
    ({"eval": [{"path": "dev.jsonl", "format": "alpaca"}], "validation": 0.1}, ("eval/generate/",)),
])
def test_console_hides_the_keys_that_repeat_others(data, hidden):
    """One eval set's own keys repeat the aggregate, eval/generate/... repeat eval/<metric>: logged, not shown."""
    from types import SimpleNamespace

    from bigsft.config import config_from_dict
    from bigsft.train import Trainer

    cfg = config_from_dict({"output_dir": "x", "model": {"name_or_path": "m"},
                            "data": {"train": [{"path": "t.jsonl", "format": "alpaca"}], **data}})
    assert Trainer.repeated_keys(SimpleNamespace(cfg=cfg)) == hidden
