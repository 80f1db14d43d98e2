"""Builds models from `model.config` under ZeRO-3 (one gloo rank, partitioned construction) and without it,
and prints one JSON line per case: are the weights identical, are tied weights still one tensor?

Run by tests/integration/test_init_parity.py as `python init_zero3_check.py TOKENIZER_DIR`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigsft.config import LoraConfig, ModelConfig
from bigsft.model import build_model, load_hf_config

import tiny

DS = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3}}
CASES = {
    "qwen2_tied_new_pad": dict(config=tiny.QWEN2),
    "llama_classifier": dict(config=tiny.LLAMA, task="sequence_classification", num_labels=3),
    "bert_classifier": dict(config=tiny.BERT, task="sequence_classification", num_labels=3),
    "gpt2": dict(config=tiny.GPT2),
    "llama_lora": dict(config=tiny.LLAMA, lora=LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
}


def weights(model) -> dict[str, torch.Tensor]:
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")]):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def tied(model) -> bool | None:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return None if out is None or not model.config.tie_word_embeddings else out.weight is inp.weight


def main(tokenizer_dir: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"pad_token": "<pad>"})  # one more token than the config's vocabulary: a resize
    for name, keys in CASES.items():
        keys = dict(keys)
        cfg = ModelConfig(config={**keys.pop("config"), "vocab_size": 400}, tokenizer=tokenizer_dir, **keys)
        built = {}
        for zero3 in (True, False):
            hf_ds = HfDeepSpeedConfig(DS) if zero3 else None  # what train() holds around build_model
            torch.manual_seed(7)
            model = build_model(cfg, load_hf_config(cfg), tokenizer=tok, seed=7)
            partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
            built[zero3] = (weights(model), tied(model), partitioned)
            del hf_ds
        (w3, tied3, part3), (w0, tied0, part0) = built[True], built[False]
        differ = sorted(n for n in w0 if n not in w3 or not torch.equal(w0[n], w3[n]))
        print(json.dumps({"case": name, "partitioned": [part3, part0], "tied": [tied3, tied0], "differ": differ,
                          "params": len(w0)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
