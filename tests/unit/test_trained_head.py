"""The LM head on trained positions only, with packed rows, for every family it is installed on beyond the
Llama / GPT-2 check in test_evaluate.py: same loss and gradients as the full head, and as the samples run
one by one (packing isolates samples only with position ids, no attention mask and no KV cache)."""

from __future__ import annotations

import pytest
import torch

from bigsft.data.batching import collate, collate_packed
from bigsft.data.tokenize import IGNORE, Sample
from bigsft.evaluate import summed_loss
from bigsft.model import HEAD_ON_TRAINED_FAMILIES, trained_positions_head

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256, "vocab_size": 400, "tie_word_embeddings": False}
FAMILIES = {
    "mistral": SMALL,
    "qwen2": {**SMALL, "tie_word_embeddings": True},
    "qwen3": {**SMALL, "head_dim": 16},
    "phi3": {**SMALL, "pad_token_id": 0},  # its default pad id (32000) lies outside a 400-token vocabulary
}


def sample(gen: torch.Generator, length: int, prompt: int) -> Sample:
    ids = torch.randint(3, 400, (length,), generator=gen).tolist()
    targets = [IGNORE] * prompt + [*ids[1:], 2][prompt:]  # next-token targets on the response, then EOS
    return Sample(input_ids=ids, targets=targets)


def model_for(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **FAMILIES[family]))
    model.config.use_cache = False
    return model.eval()  # no dropout: the three computations must agree to rounding


def loss_and_grads(model, batches, head=None) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    total = 0.0
    for batch in batches:
        loss, logits = summed_loss(model, batch, task="causal_lm", head=head)
        loss.backward()
        total += loss.item()
        if head is not None:
            assert logits.shape == (batch.num_targets, 400)
    return total, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_head_on_trained_positions_with_packing_equals_the_full_head(family):
    assert family in HEAD_ON_TRAINED_FAMILIES
    model = model_for(family)
    gen = torch.Generator().manual_seed(1)
    rows = [[sample(gen, 9, 4), sample(gen, 14, 6), sample(gen, 6, 2)], [sample(gen, 17, 10), sample(gen, 5, 5)]]
    packed = collate_packed(rows, pad_id=0)
    assert "attention_mask" not in packed.inputs and packed.inputs["input_ids"].shape == (2, 29)

    one_by_one, one_by_one_grads = loss_and_grads(model, [collate([s], pad_id=0) for row in rows for s in row])
    full, full_grads = loss_and_grads(model, [packed])
    head = trained_positions_head(model, model.config)
    assert head is not None
    picked, picked_grads = loss_and_grads(model, [packed], head)

    assert picked == pytest.approx(full, rel=1e-6)
    assert picked == pytest.approx(one_by_one, rel=1e-5)  # no attention across samples in a packed row
    for (name, _), a, b, c in zip(model.named_parameters(), full_grads, picked_grads, one_by_one_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-6, msg=name)
    assert model(**packed.inputs).logits.shape == (2, 29, 400)  # outside selecting() the model is stock
