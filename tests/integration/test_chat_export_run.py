"""A model trained on conversations ships the chat template it was trained with, and stops at its turn end."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from conftest import REPO, causal_config, check, launch, launch_env

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""Qwen-style ChatML: a turn ends with <|im_end|>, no EOS."""


def conversation(i: int) -> list[dict]:
    return [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": f"Add {i} and 3."},
            {"role": "assistant", "content": f"{i} plus 3 is {i + 3}."}]


def rendered(tokenizer, messages: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@pytest.mark.slow
def test_final_and_export_carry_the_trained_template_and_stop_at_the_end_of_turn(tmp_path, tokenizer_dir, llama_dir):
    from transformers import AutoTokenizer, GenerationConfig

    from bigsft.config import load_config
    from bigsft.data.formats import PARSERS
    from bigsft.data.tokenize import IGNORE, SampleBuilder
    from bigsft.model import build_tokenizer

    chatml = AutoTokenizer.from_pretrained(tokenizer_dir)  # <|im_end|> one special token, as in Qwen's
    chatml.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    chatml.save_pretrained(tmp_path / "tokenizer")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": conversation(i)}) + "\n" for i in range(16)))
    config = causal_config(tmp_path, llama_dir, train, max_steps=2)
    raw = yaml.safe_load(config.read_text())
    raw["model"]["tokenizer"] = str(tmp_path / "tokenizer")
    raw["data"]["train"][0]["format"] = "messages"
    raw["data"]["chat_template"] = CHATML
    config.write_text(yaml.safe_dump(raw))
    check(launch([str(config)], launcher="plain"))
    run = tmp_path / "run"
    export = subprocess.run(["bigsft", "export", str(run), str(tmp_path / "exported")], capture_output=True, text=True,
                            env=launch_env(), cwd=REPO)
    assert export.returncode == 0, export.stderr

    # What bigsft trained on for an eval conversation: its tokenizer's render of the same record.
    cfg = load_config(str(config))
    messages = conversation(41)
    sample = SampleBuilder(build_tokenizer(cfg.model), max_length=128, chat_template=CHATML)(
        PARSERS["messages"]({"messages": messages}, {}))
    last_trained = sample.input_ids[max(t for t, target in enumerate(sample.targets) if target != IGNORE) + 1]
    for out in (run / "final", tmp_path / "exported"):
        tokenizer = AutoTokenizer.from_pretrained(out)
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert tokenizer.chat_template == CHATML, out
        assert rendered(tokenizer, messages) == sample.input_ids, out
        assert last_trained == im_end  # the turn's trained tokens end in the stop id
        eos = GenerationConfig.from_pretrained(out).eos_token_id
        assert eos == [tokenizer.eos_token_id, im_end], (out, eos)
        assert Path(out, "generation_config.json").exists()
