"""Generation eval (`eval.generate`): the model answers eval prompts greedily, scored against the references.

The prompts are the first `samples` usable examples of the eval sets, in set order: a conversation up to
its last assistant turn, or a completion's prompt. Every rank reads the same list, and rank r answers
prompts r, r + world, ...; the answers are gathered in prompt order, so the samples do not depend on the
world size. Under ZeRO-3 a forward pass gathers each layer's parameters collectively: every rank then
calls `generate` the same number of times (a rank without a prompt left answers a stand-in) with
`synced_gpus`, which keeps a rank that has finished stepping until all have.

Scores come from maintained libraries: sacreBLEU for BLEU (its `zh` tokenizer when the references hold
CJK text) and Google's rouge-score for ROUGE-L, fed the same word split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bigsft import dist
from bigsft.config import ConfigError, DataConfig, GenerateConfig
from bigsft.data.formats import BadRecordError, parser_for
from bigsft.data.sources import EPOCH_END, BadRecord, SourceReader, list_files

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


@dataclass(frozen=True)
class GenerationPrompt:
    ids: list[int]
    reference: str
    set: str
    """The eval set it came from."""


def _readers(sources, split: str, holdouts=()) -> list[tuple[SourceReader, object]]:
    return [(SourceReader(s, list_files(s, f"data.{split}[{i}]"), seed=0, index=i, dp_rank=0, dp_size=1,
                          shuffle_files=False, cycle=False, holdout=holdouts[i] if holdouts else None), s)
            for i, s in enumerate(sources)]


def generation_prompts(data: DataConfig, run_data, samples: int) -> list[GenerationPrompt]:
    """The first `samples` examples of the eval sets that have a prompt and an answer, in set order."""
    from bigsft.data import eval_set_names

    sets = [_readers([s], "eval") for s in data.eval]
    if data.validation is not None:
        sets.append(_readers(data.train, "train", run_data.holdouts("validation")))
    prompts: list[GenerationPrompt] = []
    for name, readers in zip(eval_set_names(data), sets, strict=True):
        for reader, source in readers:
            while len(prompts) < samples and (item := reader.next()) is not None:
                if item is EPOCH_END or isinstance(item, BadRecord):
                    continue
                try:
                    example = parser_for(source)(item.fields, source.columns)
                    ids, reference = run_data.build.generation_prompt(example)
                except BadRecordError:
                    continue
                prompts.append(GenerationPrompt(ids, reference, name))
    if not prompts:
        raise ConfigError("eval.generate: no eval example has a prompt to answer (a conversation with an assistant "
                          "turn, or a prompt/completion record)")
    return prompts


def stop_ids(tokenizer) -> list[int]:
    """The tokens that end an answer: the EOS and the chat template's end-of-turn marker."""
    from bigsft.data.tokenize import end_of_turn_ids

    ids = end_of_turn_ids(tokenizer)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def generate(model, prompts: list[GenerationPrompt], *, tokenizer, max_new_tokens: int, device,
             synced: bool) -> list[str]:
    """Every prompt's greedy answer, on every rank, in prompt order. `synced` (ZeRO-3 on several ranks):
    every rank steps `generate` in lockstep."""
    import torch
    from transformers import GenerationConfig

    rank, world = dist.rank(), dist.world_size()
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    extra = {}
    if encoder_decoder:  # the decoder starts from its start token and stops at the model's end token
        own = model.generation_config
        stops = [i for i in [own.eos_token_id, tokenizer.eos_token_id] if i is not None]
        extra["decoder_start_token_id"] = own.decoder_start_token_id
    else:
        stops = stop_ids(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=stops or None, **extra)
    mine: list[tuple[int, str]] = []
    rounds = -(-len(prompts) // world)
    with torch.no_grad():
        for r in range(rounds):
            index = r * world + rank
            if index >= len(prompts) and not synced:
                break
            prompt = prompts[min(index, len(prompts) - 1)]  # past the end: a stand-in that keeps the lockstep
            ids = torch.tensor([prompt.ids], dtype=torch.long, device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 synced_gpus=synced)
            if index < len(prompts):
                # A decoder-only model's output repeats the prompt; an encoder-decoder's starts with the start token.
                new = out[0, 1:] if encoder_decoder else out[0, len(prompt.ids):]
                mine.append((index, _answer(new.tolist(), stops, tokenizer)))
    answers = dict(pair for part in dist.all_gather_object(mine) for pair in part)
    return [answers[i] for i in range(len(prompts))]


def _answer(new_ids: list[int], stops: list[int], tokenizer) -> str:
    end = next((i for i, t in enumerate(new_ids) if t in stops), len(new_ids))
    return tokenizer.decode(new_ids[:end], skip_special_tokens=True).strip()


class _Words:
    """The word split BLEU uses (13a, or zh for CJK text), for rouge-score, whose own split drops non-ASCII."""

    def __init__(self, cjk: bool):
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
        from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

        self.split = TokenizerZh() if cjk else Tokenizer13a()

    def tokenize(self, text: str) -> list[str]:
        return self.split(text).lower().split()


def _normalized(text: str) -> str:
    return " ".join(text.split())


def scores(outputs: list[str], references: list[str], metrics: list[str]) -> dict[str, float]:
    """eval/<metric> and eval/generate/<metric> (the same value): exact_match and rouge_l (mean F1) in [0, 1],
    bleu (corpus sacreBLEU) in [0, 100]."""
    n = max(len(outputs), 1)
    cjk = any(_CJK.search(r) for r in references)
    out = {}
    if "exact_match" in metrics:
        out["eval/generate/exact_match"] = sum(_normalized(o) == _normalized(r) for o, r in zip(outputs, references)) / n
    if "rouge_l" in metrics:
        from rouge_score.rouge_scorer import RougeScorer

        scorer = RougeScorer(["rougeL"], tokenizer=_Words(cjk))
        out["eval/generate/rouge_l"] = sum(scorer.score(r, o)["rougeL"].fmeasure for o, r in zip(outputs, references)) / n
    if "bleu" in metrics:
        import sacrebleu

        out["eval/generate/bleu"] = sacrebleu.corpus_bleu(outputs, [references], tokenize="zh" if cjk else "13a").score
    return {**{k.replace("/generate/", "/"): v for k, v in out.items()}, **out}


def generation_eval(model, prompts: list[GenerationPrompt], cfg: GenerateConfig, *, tokenizer, device,
                    synced: bool) -> tuple[dict[str, float], list[dict]]:
    """(scores, one row per prompt: set, prompt text, reference, output)."""
    outputs = generate(model, prompts, tokenizer=tokenizer, max_new_tokens=cfg.max_new_tokens, device=device,
                       synced=synced)
    rows = [{"set": p.set, "prompt": tokenizer.decode(p.ids), "reference": p.reference, "output": o}
            for p, o in zip(prompts, outputs, strict=True)]
    return scores(outputs, [p.reference for p in prompts], cfg.metrics), rows

