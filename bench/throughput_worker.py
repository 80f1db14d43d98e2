"""The peers of bench/throughput.py, one per process: `hf` (transformers' Trainer), `trl` (SFTTrainer)
and `bare` (a plain PyTorch loop over bigsft's packed batches). Prints one JSON line with the median
trained tokens/s over the steps after the first two.

    python bench/throughput_worker.py hf|trl|bare CONFIG STEPS
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

import torch


def samples_and_tokenizer(cfg):
    from transformers import AutoTokenizer

    from bigsft.data.scan import SplitStats, build_samples, read_examples
    from bigsft.data.tokenize import SampleBuilder

    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    tok.pad_token = tok.pad_token or tok.eos_token
    samples = build_samples(read_examples(cfg.data.train, "train", SplitStats()),
                            SampleBuilder(tok, max_length=cfg.data.max_length), SplitStats())
    return samples, tok


def hf_rows(samples):
    """bigsft's samples as HF users feed them: labels aligned with input_ids (the model shifts them)."""
    rows = []
    for s in samples:
        labels = [-100] + [t if t != -100 else -100 for t in s.targets[:-1]]
        rows.append({"input_ids": s.input_ids, "attention_mask": [1] * len(s.input_ids), "labels": labels})
    return rows


def run_hf(cfg, steps: int, trl: bool) -> list[float]:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    samples, tok = samples_and_tokenizer(cfg)
    data = Dataset.from_list(hf_rows(samples))
    counted = {"tokens": 0}
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start, counted["tokens"] = time.perf_counter(), 0

        def on_step_end(self, args, state, control, **kw):
            times.append(counted["tokens"] / (time.perf_counter() - self.start))

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *a, **kw):
            counted["tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().training_step(model, inputs, *a, **kw)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    args = TrainingArguments(output_dir="/tmp/bigsft-bench-hf", per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, max_steps=steps, learning_rate=3e-4, logging_steps=10**6,
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                             max_grad_norm=1.0, lr_scheduler_type="cosine", disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    if trl:
        from trl import SFTConfig, SFTTrainer

        sft_args = SFTConfig(**{**args.to_dict(), "output_dir": "/tmp/bigsft-bench-trl"}, packing=False)
        trainer = SFTTrainer(model=model, args=sft_args, train_dataset=data, data_collator=collator,
                             processing_class=tok, callbacks=[Timer()])
    else:
        trainer = CountingTrainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[Timer()])
    trainer.train()
    return times


def run_bare(cfg, steps: int) -> list[float]:
    from transformers import AutoModelForCausalLM

    from bigsft.batch_math import BatchMath
    from bigsft.data import setup_data, train_stream
    from bigsft.data.scan import SplitStats
    from bigsft.evaluate import summed_loss
    from bigsft.model import build_tokenizer, trained_positions_head

    tok = build_tokenizer(cfg.model)
    plan = setup_data(cfg.data, cfg.model, tok)
    batch = BatchMath(micro_batch_size=int(sys.argv[4]) if len(sys.argv) > 4 else 2, gradient_accumulation_steps=2,
                      data_parallel_size=1)
    stream = train_stream(cfg.data, plan, SplitStats(), seed=0, batch=batch, dp_rank=0, pad_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    model.config.use_cache = False
    head = trained_positions_head(model, model.config)  # the same model arithmetic as bigsft's
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    times = []
    for step in range(steps):
        window = stream.next_window()
        start = time.perf_counter()
        targets = sum(b.num_targets for b in window)
        for batch in window:
            loss, _ = summed_loss(model, batch, task="causal_lm", head=head)
            (loss / targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = 3e-4 * 0.5 * (1 + math.cos(math.pi * step / steps))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(targets / (time.perf_counter() - start))
    return times


def main() -> None:
    from bigsft.config import load_config

    mode, config, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = load_config(config, ["data.packing=true"] if mode == "bare" else [])
    times = run_bare(cfg, steps) if mode == "bare" else run_hf(cfg, steps, trl=mode == "trl")
    print(json.dumps({"tokens_per_s": statistics.median(times[2:])}))


if __name__ == "__main__":
    main()
