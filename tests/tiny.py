"""Tiny assets for tests, built offline: a BPE tokenizer, tiny model directories, synthetic data."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["river", "stone", "cloud", "apple", "window", "garden", "silver", "rocket", "pencil", "forest", "candle", "winter", "harbor", "violin", "meadow", "lantern", "copper", "orchard", "thunder", "marble", "falcon", "ribbon", "glacier", "pepper"]
COUNTRIES = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
             "Egypt": "Cairo", "Chile": "Santiago", "India": "New Delhi"}


def alpaca_records(n: int, seed: int = 0) -> list[dict]:
    """Small instruction-following records with a learnable pattern (and a varied length)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            out.append({"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."})
        elif kind == 1:
            w = rng.choice(WORDS)
            out.append({"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]})
        elif kind == 2:
            c = rng.choice(sorted(COUNTRIES))
            out.append({"instruction": f"What is the capital of {c}?", "input": "",
                        "output": f"The capital of {c} is {COUNTRIES[c]}."})
        else:
            ws = rng.sample(WORDS, rng.randrange(2, 7))
            out.append({"instruction": "Sort these words alphabetically.", "input": ", ".join(ws),
                        "output": ", ".join(sorted(ws))})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _byte_level_bpe(texts: list[str], *, vocab_size: int, specials: list[str], prefix_space: bool):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`, with `specials` first in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def build_tokenizer(out_dir: Path, *, vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer with BOS/EOS/UNK and no pad token or chat template."""
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(str(v) for v in r.values()) for r in alpaca_records(2000, seed=123)]
    corpus += ["<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_start|>system\n"] * 50
    tok = _byte_level_bpe(corpus, vocab_size=vocab_size, specials=["<unk>", "<s>", "</s>"], prefix_space=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return out_dir


LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
         "tie_word_embeddings": False}
QWEN2 = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
         "tie_word_embeddings": True}
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512, "resid_pdrop": 0.0,
        "embd_pdrop": 0.0, "attn_pdrop": 0.0}
BERT = {"model_type": "bert", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 512}


def build_char_tokenizer(out_dir: Path, texts: list[str]) -> Path:
    """A BERT-style tokenizer whose vocabulary is every character of `texts` ([CLS] ... [SEP], one token per
    character): for Chinese, which MiniLM's English WordPiece vocabulary mostly maps to [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split("", behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    fast.save_pretrained(out_dir)
    return out_dir


T5 = {"model_type": "t5", "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_decoder_layers": 2,
      "num_heads": 4, "relative_attention_num_buckets": 8, "dropout_rate": 0.0}
MARIAN = {"model_type": "marian", "d_model": 64, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_layers": 2,
          "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4, "max_position_embeddings": 256,
          "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}


def build_seq2seq_tokenizer(out_dir: Path, texts: list[str], *, vocab_size: int = 1000) -> Path:
    """A byte-level BPE tokenizer trained on `texts`, T5-style: <pad> 0, </s> 1 (appended to every text), <unk> 2,
    no BOS."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _byte_level_bpe(texts, vocab_size=vocab_size, specials=["<pad>", "</s>", "<unk>"], prefix_space=True)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return out_dir


def build_model_dir(out_dir: Path, tokenizer_dir: Path, config: dict, *, seed: int = 0,
                    task: str = "causal_lm") -> Path:
    """Random weights from a transformers config, saved with the tokenizer as a pretrained directory."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    raw = dict(config)
    cfg = AutoConfig.for_model(raw.pop("model_type"), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **raw)
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    model = auto.from_config(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


POISON_MODELING = """
from transformers import LlamaConfig, LlamaForCausalLM


class PoisonConfig(LlamaConfig):
    model_type = "poison_llama"

    def __init__(self, poison_token_id=0, **kwargs):
        self.poison_token_id = poison_token_id
        super().__init__(**kwargs)


class PoisonForCausalLM(LlamaForCausalLM):
    \"\"\"A Llama whose logits turn NaN for any sequence holding the poison token: a real model (loaded
    with trust_remote_code) that produces a non-finite loss on exactly the samples a test chooses.\"\"\"

    config_class = PoisonConfig

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        if input_ids is not None and (input_ids == self.config.poison_token_id).any():
            out.logits = out.logits + float("nan")
        return out
"""
POISON = "\u00a7"  # a character that appears nowhere else in the test data


def build_poison_model_dir(out_dir: Path, tokenizer_dir: Path) -> Path:
    """A tiny Llama with remote code that makes the loss NaN wherever POISON appears."""
    from transformers import AutoTokenizer

    build_model_dir(out_dir, tokenizer_dir, LLAMA)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    (out_dir / "modeling_poison.py").write_text(POISON_MODELING)
    config = json.loads((out_dir / "config.json").read_text())
    config.update(model_type="poison_llama", architectures=["PoisonForCausalLM"],
                  poison_token_id=tok.convert_tokens_to_ids(POISON),
                  auto_map={"AutoConfig": "modeling_poison.PoisonConfig",
                            "AutoModelForCausalLM": "modeling_poison.PoisonForCausalLM"})
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir
