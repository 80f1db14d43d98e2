#!/usr/bin/env bash
# On a machine with a CUDA GPU: a ~1B-parameter Llama-style model in bf16 with packing, trained for a
# fixed number of steps by bigsft and by the Hugging Face Trainer on the same data; prints tokens/s,
# TFLOP/s and MFU for each, as a short table last. Runs end to end in well under 8 minutes on one
# H100/H200-class GPU.
#
#   bash bench/gpu.sh            # reads STEPS (default 30), SEQ (2048), MICRO (4 rows), PEAK_TFLOPS
#   SMOKE=1 bash bench/gpu.sh    # the same path on CPU with a tiny model, to check the script (tests do)
#
# TFLOP/s counts 6·N·T + 12·L·d·Σ tᵢ² FLOPs per step (see README, Tracking); MFU divides by
# PEAK_TFLOPS, or by the device's bf16 peak from bigsft's table of known GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${BIGSFT_PYTHON:-python3}
SMOKE=${SMOKE:-0}
if [[ "$SMOKE" != 1 ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: no CUDA GPU visible to torch; run it on a GPU machine (or SMOKE=1 to check the script)" >&2
    exit 2
fi
if [[ "$SMOKE" == 1 ]]; then
    STEPS=${STEPS:-5} SEQ=${SEQ:-256} MICRO=${MICRO:-2}
fi
STEPS=${STEPS:-30}
SEQ=${SEQ:-2048}
MICRO=${MICRO:-4}
export SMOKE
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bigsft-gpu-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

"$PY" - "$WORK" "$SEQ" <<'PYEOF'
import json, os, sys
from pathlib import Path
sys.path.insert(0, "tests")
import torch, tiny
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

work, seq = Path(sys.argv[1]), int(sys.argv[2])
tok = AutoTokenizer.from_pretrained(tiny.build_tokenizer(work / "tok", vocab_size=8000))
shared = Path("../shared/data/alpaca_en_demo.json")
records = json.loads(shared.read_text()) if shared.is_file() else tiny.alpaca_records(4000, seed=0)
tiny.write_jsonl(work / "train.jsonl", (records * 8)[:8000])
smoke = os.environ["SMOKE"] == "1"
size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if smoke else \
    dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16)
cfg = AutoConfig.for_model("llama", vocab_size=len(tok), num_key_value_heads=size["num_attention_heads"],
                           max_position_embeddings=seq, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           **size)
with torch.device("cpu" if smoke else "cuda"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained(work / "model")
tok.save_pretrained(work / "model")
print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", file=sys.stderr)
PYEOF

cat >"$WORK/run.yaml" <<YAML
output_dir: $WORK/bigsft
model: {name_or_path: $WORK/model, dtype: bf16, attn_implementation: sdpa}
data: {train: [{path: $WORK/train.jsonl, format: alpaca}], packing: true, max_length: $SEQ}
train: {micro_batch_size: $MICRO, gradient_accumulation_steps: 1, max_steps: $STEPS, lr: 1.0e-4, log_every: 1,
        save_every: 1000000, resume: never, peak_tflops: ${PEAK_TFLOPS:-null}}
deepspeed: zero0
YAML
"$PY" -m bigsft.train "$WORK/run.yaml" >"$WORK/bigsft.log" 2>&1 || { tail -30 "$WORK/bigsft.log"; exit 1; }

"$PY" - "$WORK" "$STEPS" "$MICRO" "$SEQ" <<'PYEOF'
import json, os, statistics, sys, time
from pathlib import Path
import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                          TrainingArguments)
sys.path.insert(0, "bench")
sys.path.insert(0, ".")
from throughput_worker import hf_rows
from bigsft.config import load_config
from bigsft.data.scan import SplitStats, build_samples, read_examples
from bigsft.data.tokenize import SampleBuilder
from bigsft.tracking import model_flops, peak_tflops

work, steps, micro, seq = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = load_config(str(work / "run.yaml"))
tok = AutoTokenizer.from_pretrained(work / "model")
tok.pad_token = tok.pad_token or tok.eos_token
samples = build_samples(read_examples(cfg.data.train, "train", SplitStats(), limit=4000),
                        SampleBuilder(tok, max_length=seq), SplitStats())
mean = statistics.mean(len(s.input_ids) for s in samples)
per_device = max(1, round(micro * seq / mean))  # about the tokens of bigsft's packed micro-batch
model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16, attn_implementation="sdpa")
params = sum(p.numel() for p in model.parameters())
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
stats = {"tokens": 0, "processed": 0, "pairs": 0, "times": [], "flops": []}

class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        sync(); self.start = time.perf_counter()
        stats["tokens"] = stats["processed"] = stats["pairs"] = 0
    def on_step_end(self, args, state, control, **kw):
        sync(); dt = time.perf_counter() - self.start
        stats["times"].append(stats["tokens"] / dt)
        stats["flops"].append(model_flops(params=params, layers=model.config.num_hidden_layers,
                                          hidden=model.config.hidden_size, tokens=stats["processed"],
                                          attention_pairs=stats["pairs"]) / dt / 1e12)

class Counting(Trainer):
    def training_step(self, model, inputs, *a, **kw):
        mask = inputs["attention_mask"]  # tokens/s counts trained tokens (with a label), as bigsft logs them
        stats["tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
        stats["processed"] += int(mask.sum()); stats["pairs"] += int((mask.sum(1) ** 2).sum())
        return super().training_step(model, inputs, *a, **kw)

args = TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=per_device, max_steps=steps,
                         learning_rate=1e-4, bf16=True, logging_steps=10**6, save_strategy="no", report_to=[],
                         dataloader_num_workers=2, disable_tqdm=True, use_cpu=os.environ["SMOKE"] == "1")
Counting(model=model, args=args, train_dataset=Dataset.from_list(hf_rows(samples)),
         data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100), callbacks=[Timer()]).train()
peak = peak_tflops(cfg.train.peak_tflops, "bf16")
records = [json.loads(l) for l in (work / "bigsft" / "metrics.jsonl").read_text().splitlines()]
steps_b = [r for r in records if "loss" in r][3:]
rows = [("bigsft (packed)", statistics.median(r["tokens_per_s"] for r in steps_b),
         statistics.median(r["tflops_per_device"] for r in steps_b)),
        ("HF Trainer (padded)", statistics.median(stats["times"][3:]), statistics.median(stats["flops"][3:]))]
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (SMOKE=1)"
print(f"\n{device}, {params / 1e9:.2f}B Llama, bf16, {steps} steps, sequence {seq}")
print(f"{'':22}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}")
for name, rate, tf in rows:
    mfu = f"{tf / peak:.1%}" if peak else "n/a"
    print(f"{name:22}{rate:>12,.0f}{tf:>10.1f}{mfu:>8}")
print(f"bigsft / HF Trainer tokens/s: {rows[0][1] / rows[1][1]:.2f}x")
PYEOF
