"""`bigsft evaluate MODEL CONFIG`: the fine-tuning workflow's last step as a command of its own.

MODEL is a `final/` directory, any exported HF model directory, a checkpoint (step_NNNNNNNN, exported
first), or a pretrained model (then a new classification head: the before-training baseline). The
config's `data.eval` says what to evaluate on, with the metrics training logs (and with `eval.generate`,
the generation eval, its answers in `output_dir/samples/evaluate.jsonl`), counted exactly once
across ranks on one or many (`torchrun -m bigsft evaluate ...`). The report goes to
`output_dir/eval_report.json`, keyed as `metrics.jsonl`'s eval keys.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from bigsft import dist, tracking
from bigsft.config import ConfigError, RunConfig, generation_config
from bigsft.dist import LaunchEnv
from bigsft.files import write_json_atomically, write_jsonl_atomically


def _model_dir(model: str, scratch: Path) -> str:
    """An HF model directory (or hub id / pkg: source) for MODEL; a checkpoint is exported first, by every
    rank into its own `scratch` (a node-local temporary directory; each rank loads the whole model anyway)."""
    path = Path(model)
    if not (path / "trainer.json").is_file():
        return model
    from bigsft.export import export_checkpoint

    export_checkpoint(path, scratch / "model")
    return str(scratch / "model")


TASK_HEADS = {"sequence_classification": ("ForSequenceClassification", "a sequence classifier"),
              "token_classification": ("ForTokenClassification", "a token classifier"),
              "question_answering": ("ForQuestionAnswering", "an extractive QA model")}
"""Tasks whose head is trained from scratch on a pretrained backbone, by the architecture suffix of that head."""


def _head_problems(hf_config, task: str, id2label: dict[int, str] | None) -> list[str]:
    """A trained head that cannot score this data: another task's, or other classes. A backbone without one
    gets a new head: the untrained baseline."""
    archs = getattr(hf_config, "architectures", None) or []
    for other, (suffix, what) in TASK_HEADS.items():
        head = next((a for a in archs if a.endswith(suffix)), None)
        if head is not None and other != task:
            return [f"MODEL is {what} ({head}) but the config's model.task is {task}"]
    if task not in TASK_HEADS or id2label is None or not any(a.endswith(TASK_HEADS[task][0]) for a in archs):
        return []
    theirs = {int(k): v for k, v in (hf_config.id2label or {}).items()}
    if len(theirs) != len(id2label):
        return [f"MODEL classifies {len(theirs)} classes, the data {len(id2label)} ({', '.join(id2label.values())})"]
    named = any(not v.startswith("LABEL_") for v in theirs.values())
    if named and theirs != id2label:
        return [f"MODEL's classes {list(theirs.values())} are not the data's {list(id2label.values())} (in id order)"]
    return []


def evaluate_model(model: str, cfg: RunConfig, launch: LaunchEnv) -> dict[str, float]:
    """The eval metrics of MODEL on cfg.data.eval; rank 0 writes them to output_dir/eval_report.json."""
    import torch
    from deepspeed.accelerator import get_accelerator

    from bigsft.batch_math import BatchMath
    from bigsft.data import eval_sets, setup_data
    from bigsft.data.scan import SplitStats
    from bigsft.evaluate import dummy_for_task, evaluate
    from bigsft.model import build_model, build_tokenizer, load_hf_config, trained_positions_head

    if not cfg.data.has_eval:
        raise ConfigError("data.eval: bigsft evaluate needs eval data in the config (data.eval or data.validation)")
    with tempfile.TemporaryDirectory(prefix="bigsft-evaluate-") as scratch:
        # Before the process group: once one exists, transformers writes exports on rank 0 only.
        source = _model_dir(model, Path(scratch))
        # The model directory's own tokenizer (final/ and exports carry it), else the config's.
        own_tokenizer = (Path(source) / "tokenizer_config.json").is_file() or cfg.model.tokenizer is None
        model_cfg = dataclasses.replace(cfg.model, name_or_path=source, config=None, lora=None, decoder=None,
                                        gradient_checkpointing=False,
                                        tokenizer=None if own_tokenizer else cfg.model.tokenizer)
        hf_config = load_hf_config(model_cfg)
        tokenizer = build_tokenizer(model_cfg)
        run_data = setup_data(cfg.data, model_cfg, tokenizer)
        problems = _head_problems(hf_config, cfg.model.task, run_data.id2label)
        if problems:
            raise ConfigError(problems)
        torch.manual_seed(cfg.train.seed)  # a new head (the baseline) is the same on every rank
        net = build_model(model_cfg, hf_config, tokenizer=tokenizer, id2label=run_data.id2label, seed=cfg.train.seed)
    dist.init_process_group(launch)
    try:
        device = get_accelerator().current_device_name()
        net = net.to(device).eval()
        causal = cfg.model.task == "causal_lm"
        ranks = BatchMath(micro_batch_size=cfg.train.micro_batch_size, gradient_accumulation_steps=1,
                          data_parallel_size=launch.world_size, eval_micro_batch_size=cfg.train.eval_micro_batch_size)
        sets = eval_sets(cfg.data, run_data, SplitStats(), batch=ranks, dp_rank=launch.rank,
                         pad_id=tokenizer.pad_token_id)
        report: dict = {}
        labels = list(run_data.id2label.values()) if run_data.id2label else None
        metrics = evaluate(net, sets, task=cfg.model.task, num_labels=len(labels) if labels else None, device=device,
                           dummy=dummy_for_task(cfg.model.task, tokenizer.pad_token_id),
                           head=trained_positions_head(net, hf_config) if causal else None, label_names=labels,
                           report=report, max_answer_length=cfg.eval.max_answer_length)
        rows = None
        generate = generation_config(cfg)
        if generate is not None:
            from bigsft.generation import generation_eval, generation_prompts

            # Each rank holds the whole model: no lockstep needed.
            scores, rows = generation_eval(net, generation_prompts(cfg.data, run_data, generate.samples),
                                           generate, tokenizer=tokenizer, device=device, synced=False)
            metrics.update(scores)
    finally:
        dist.destroy_process_group()
    if launch.is_main:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomically(out / tracking.EVAL_REPORT, {**metrics, **report})
        if rows is not None:
            write_jsonl_atomically(out / "samples" / "evaluate.jsonl", rows)
            tracking.info(f"samples: {out / 'samples' / 'evaluate.jsonl'}")
        tracking.print_metrics(f"evaluation of {model}", {"eval": metrics}, hide=("eval/generate/",))
        if report:
            tracking.print_class_report(report)
        tracking.info(f"report: {out / tracking.EVAL_REPORT}")
    return metrics
