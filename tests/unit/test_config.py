"""Config loading, overrides, validation messages, redaction, and every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bigsft.config import (
    RECIPES_DIR,
    REDACTED,
    ConfigError,
    RunConfig,
    apply_override,
    config_from_dict,
    dump_yaml,
    load_config,
    parse_overrides,
    redact,
)

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "vocab_size": 128}


def base(**sections) -> dict:
    raw = {
        "output_dir": "runs/x",
        "model": {"config": dict(TINY_LLAMA), "tokenizer": "tok", "task": "causal_lm"},
        "data": {"train": [{"path": "train.jsonl", "format": "alpaca"}]},
        "train": {"lr": 1e-4},
    }
    for key, value in sections.items():
        raw[key] = value
    return raw


def with_override(*pairs: str) -> dict:
    raw = base()
    for keys, value in parse_overrides(pairs):
        apply_override(raw, keys, value)
    return raw


def test_valid_config_builds_frozen_tree():
    cfg = config_from_dict(base())
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 1e-4 and cfg.train.micro_batch_size == 8
    assert cfg.data.train[0].format == "alpaca"
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # frozen


def test_overrides_parse_types_and_nested_paths():
    raw = with_override("train.lr=3e-4", "train.max_steps=7", "model.dtype=bf16", "data.packing=false",
                        "deepspeed=ds_configs/zero3.json", "train.adam_betas=[0.9, 0.95]", "data.train.0.columns={prompt: q}")
    cfg = config_from_dict(raw)
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML reads 3e-4 as a string: converted
    assert cfg.train.max_steps == 7 and cfg.model.dtype == "bf16" and cfg.data.packing is False
    assert cfg.deepspeed == "ds_configs/zero3.json"
    assert cfg.train.adam_betas == (0.9, 0.95)
    assert cfg.data.train[0].columns == {"prompt": "q"}


def test_override_without_equals_is_a_usage_error():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_overrides(["train.lr"])


def test_yaml_file_with_relative_paths_resolves_against_config_dir(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    raw = base()
    raw["data"]["train"][0]["path"] = "data/train.jsonl"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir("/")
    cfg = load_config(str(tmp_path / "cfg.yaml"), ["train.seed=3"])
    assert cfg.data.train[0].path == str(tmp_path / "data" / "train.jsonl")
    assert cfg.train.seed == 3


def test_output_dir_defaults_to_runs_config_name(tmp_path):
    raw = base()
    del raw["output_dir"]
    (tmp_path / "myexp.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(str(tmp_path / "myexp.yaml")).output_dir == str(Path("runs") / "myexp")


def test_invalid_yaml_reports_line_and_column(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  task: [causal_lm\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


def test_missing_config_names_builtin_recipes():
    with pytest.raises(ConfigError, match="built-in recipe .*demo"):
        load_config("no/such/config.yaml")


BAD_CONFIGS = [
    # (overrides or raw-dict edit, expected message fragment)
    (["train.learning_rate=1e-4"], "unknown key 'train.learning_rate': did you mean 'train.lr'?"),
    (["lr=1e-4"], "unknown key 'lr': did you mean 'train.lr'?"),
    (["train.micro_bach_size=4"], "did you mean 'train.micro_batch_size'?"),
    (["model.dtype=float16"], "model.dtype: 'float16' is not one of 'fp32', 'bf16', 'fp16'"),
    (["train.micro_batch_size=eight"], "train.micro_batch_size: expected an integer, got 'eight'"),
    (["train.lr_schedule=cosin"], "did you mean 'cosine'?"),
    (["train.lr=0"], "train.lr: 0.0; must be > 0"),
    (["train.warmup_ratio=1.5"], "train.warmup_ratio: 1.5; must be in [0, 1)"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm: -1.0; must be >= 0"),
    (["train.adam_betas=[0.9]"], "train.adam_betas: expected a list of 2 values"),
    (["train.micro_batch_size=0"], "train.micro_batch_size: 0; must be >= 1"),
    (["data.max_length=4"], "data.max_length: 4; must be at least 8"),
    (["pipeline.stages=0"], "pipeline.stages: 0; must be >= 1"),
    (["model.name_or_path=some/model"], "set exactly one of model.name_or_path"),
    (["model.task=sequence_classification"], "model.num_labels: required for task sequence_classification"),
    (["data.train.0.format=classification"], "'classification' needs model.task: sequence_classification"),
    (["data.train.0.format=chatml"], "data.train[0].format: 'chatml' is not one of"),
    (["data.train=[]"], "data.train: at least one source is required"),
    (["data.train.0.weight=0"], "data.train[0].weight: 0.0; must be > 0"),
    (["wandb.mode=on"], "wandb.mode: 'on' is not one of 'online', 'offline', 'disabled'"),
    (["train.eval_every=-5"], "train.eval_every: -5; must be >= 0"),
    (["train.global_batch_size=0"], "train.global_batch_size: 0; must be >= 1"),
    (["data.train.0.path=null"], "data.train[0].path: required"),
    (["model.trust_remote_code=maybe"], "model.trust_remote_code: expected true or false, got 'maybe'"),
    (["eval.generate.samples=4", "data.eval=[{path: e.jsonl, format: alpaca}]", "eval.generate.max_new_tokens=0"],
     "eval.generate.max_new_tokens: 0; must be >= 1"),
    (["eval.generate.samples=4"], "eval.generate: the prompts come from the eval sets; set data.eval or data.validation"),
    (["eval.generate.metrics=[bleu,meteor]"], "eval.generate.metrics[1]: 'meteor' is not one of"),
    (["eval.generate.samples=4", "data.validation=0.1", "pipeline.stages=2"],
     "eval.generate: a pipeline-parallel run cannot generate"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS, ids=[o[0] for o, _ in BAD_CONFIGS])
def test_bad_config_message(overrides, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(with_override(*overrides))
    assert message in str(info.value)


def test_model_config_needs_type_and_tokenizer():
    raw = base()
    raw["model"] = {"config": {"hidden_size": 8}, "task": "causal_lm"}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert "needs a 'model_type' key" in str(info.value)
    assert "model.tokenizer: required with model.config" in str(info.value)


def test_labels_must_agree_with_num_labels():
    raw = base()
    raw["model"] = {"name_or_path": "m", "task": "sequence_classification", "num_labels": 3, "labels": ["a", "b"]}
    raw["data"]["train"][0]["format"] = "classification"
    with pytest.raises(ConfigError, match="model.labels has 2 names but model.num_labels is 3"):
        config_from_dict(raw)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        config_from_dict(with_override("train.lr=0", "model.dtype=half", "train.bogus=1", "data.max_length=2"))
    text = str(info.value)
    assert text.startswith("4 problems:")
    for fragment in ("train.lr", "model.dtype", "train.bogus", "data.max_length"):
        assert fragment in text


def test_redaction_hides_secrets_but_not_token_settings():
    value = {"wandb": {"api_key": "abc123"}, "model": {"config": {"pad_token_id": 0, "max_position_embeddings": 8},
             "hf_token": "hf_secret"}, "nested": [{"password": "p"}], "tokenizer": "path"}
    out = redact(value)
    assert out["wandb"]["api_key"] == REDACTED
    assert out["model"]["hf_token"] == REDACTED
    assert out["nested"][0]["password"] == REDACTED
    assert out["model"]["config"]["pad_token_id"] == 0 and out["tokenizer"] == "path"


def test_no_config_key_of_bigsfts_own_reads_as_a_secret():
    """Every setting of the config tree survives the dump (a key like data.subtoken_labels is not a token)."""
    dumped = dump_yaml(config_from_dict(base()))
    assert REDACTED not in dumped, [line for line in dumped.splitlines() if REDACTED in line]


def test_dump_is_loadable_and_redacted():
    raw = base()
    raw["model"]["config"]["auth_token"] = "sekrit"
    text = dump_yaml(config_from_dict(raw))
    assert "sekrit" not in text
    assert yaml.safe_load(text)["train"]["lr"] == 1e-4


@pytest.mark.parametrize("recipe", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = load_config(str(recipe))
    assert cfg.data.train, recipe
    for source in cfg.data.train + cfg.data.eval:
        paths = source.path if isinstance(source.path, list) else [source.path]
        assert all(Path(p).exists() for p in paths), f"{recipe.name}: {source.path} missing"


def test_wandb_keys_left_out_defer_to_wandbs_environment(monkeypatch):
    from bigsft.config import WandbConfig
    from bigsft.tracking import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(WandbConfig()) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(WandbConfig()) == "offline"
    assert wandb_mode(WandbConfig(mode="disabled")) == "disabled"  # the config wins
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # the older spelling W&B still accepts
    assert wandb_mode(WandbConfig()) == "offline"


@pytest.mark.parametrize(("value", "ok"), [(0.2, True), (10, True), (0, False), (1.0, False), (-3, False),
                                           (True, False), ("half", False)])
def test_data_validation_is_a_fraction_or_a_record_count(value, ok):
    raw = {"model": {"name_or_path": "m"}, "data": {"train": [{"path": "t.jsonl", "format": "text"}],
                                                    "validation": value}, "output_dir": "out"}
    if ok:
        assert config_from_dict(raw).data.validation == value
    else:
        with pytest.raises(ConfigError, match="data.validation"):
            config_from_dict(raw)


def test_a_wandb_mode_from_the_environment_that_wandb_refuses_is_a_config_error(monkeypatch):
    from bigsft.config import WandbConfig
    from bigsft.preflight import _wandb_problems
    from bigsft.tracking import wandb_mode

    monkeypatch.setenv("WANDB_MODE", " ")
    assert wandb_mode(WandbConfig()) == "disabled"  # blank: unset
    monkeypatch.setenv("WANDB_MODE", "offlin")
    cfg = config_from_dict(base())
    assert "WANDB_MODE='offlin' in the environment" in _wandb_problems(cfg)[0]
    assert _wandb_problems(config_from_dict(base(wandb={"mode": "offline"}))) == []  # the config wins
