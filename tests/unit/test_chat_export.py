"""The chat template a model is trained with travels with its tokenizer, and generation stops at its turn end."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

from bigsft.config import DataConfig, DataSource, ModelConfig
from bigsft.data import setup_data
from bigsft.data.tokenize import DEFAULT_CHAT_TEMPLATE, end_of_turn_ids
from bigsft.export import save_hf_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""Qwen-style ChatML: a turn ends with <|im_end|>, no EOS."""


def chatml_tokenizer(tokenizer_dir, out_dir):
    """The tiny tokenizer with <|im_start|> and <|im_end|> as single special tokens, as Qwen's has them."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


@pytest.fixture
def messages_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Add 2 and 3."},
                                             {"role": "assistant", "content": "2 plus 3 is 5."}]}) + "\n")
    return path


def plan(tok, path, fmt="messages", task="causal_lm", chat_template=None):
    data = DataConfig(train=[DataSource(path=str(path), format=fmt)], max_length=64, chat_template=chat_template)
    return setup_data(data, ModelConfig(name_or_path="x", task=task, num_labels=2), tok)


def test_the_run_tokenizer_carries_the_template_its_conversations_are_rendered_with(tokenizer_dir, messages_file,
                                                                                      tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.chat_template is None
    plan(tok, messages_file)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE  # the built-in fallback it was trained with
    own = AutoTokenizer.from_pretrained(tokenizer_dir)
    plan(own, messages_file, chat_template=CHATML)
    assert own.chat_template == CHATML  # data.chat_template
    theirs = AutoTokenizer.from_pretrained(tokenizer_dir)
    theirs.chat_template = CHATML
    plan(theirs, messages_file)
    assert theirs.chat_template == CHATML  # the tokenizer's own template is kept when data.chat_template is unset
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "plain text", "label": 1}) + "\n")
    for fmt, task in (("text", "causal_lm"), ("classification", "sequence_classification")):
        untouched = AutoTokenizer.from_pretrained(tokenizer_dir)
        untouched.pad_token = untouched.eos_token
        plan(untouched, text, fmt=fmt, task=task)
        assert untouched.chat_template is None, fmt


def test_end_of_turn_ids_are_the_single_token_markers_that_close_an_assistant_turn(tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert end_of_turn_ids(tok) == []  # no template
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    assert end_of_turn_ids(tok) == [tok.eos_token_id]  # <|im_end|> is no token here; the EOS after it is
    chatml = chatml_tokenizer(tokenizer_dir, tmp_path / "chatml")
    chatml.chat_template = CHATML
    assert end_of_turn_ids(chatml) == [chatml.convert_tokens_to_ids("<|im_end|>")]
    chatml.chat_template = DEFAULT_CHAT_TEMPLATE
    assert end_of_turn_ids(chatml) == [chatml.convert_tokens_to_ids("<|im_end|>"), chatml.eos_token_id]
    chatml.chat_template = CHATML.replace("<|im_end|>", "[END]")
    assert end_of_turn_ids(chatml) == []  # a marker of several tokens cannot be a stop id


def test_an_export_ships_the_template_and_stops_at_the_end_of_turn(tokenizer_dir, messages_file, tmp_path):
    tok = chatml_tokenizer(tokenizer_dir, tmp_path / "chatml")
    plan(tok, messages_file, chat_template=CHATML)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    out = save_hf_model(model, model.state_dict(), tmp_path / "final", tokenizer=tok)
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.chat_template == CHATML
    im_end = loaded.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(out).eos_token_id == [tok.eos_token_id, im_end]
