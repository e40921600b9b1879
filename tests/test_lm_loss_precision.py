"""LM loss precision: the evaluator's per-token loss against a float64 reference computed independently.

The reference runs a float64 copy of the same tiny ``LlamaForCausalLM`` (built from a config, with
SmolLM2's vocabulary size of 49,152 so that the class dimension is as wide as in real use) one text
at a time, without padding, and takes ``-log_softmax`` in float64 by hand. Cross-entropy taken along
a strided class dimension (``logits.transpose(1, 2)``) was about 6e-5 per token off this reference.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from mergetune.objectives.evaluators import LMLossEvaluator

VOCAB = 49_152  # SmolLM2's vocabulary: the width of the softmax is what costs precision
WORDS = [f"w{i}" for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level fast tokenizer (BOS first, no pad token), built here: nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.model_input_names = ["input_ids", "attention_mask"]
    return fast


@pytest.fixture(scope="module")
def model():
    """A tiny Llama whose logits spread like a trained model's (std about 3), in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        llama = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        llama.lm_head.weight.mul_(20.0)  # random init gives near-uniform logits; a trained head does not
    return llama


def reference_losses(model: torch.nn.Module, tokenizer, texts: list[str]) -> tuple[float, list[float]]:
    """(token-weighted mean loss, per-text mean loss) in float64, one unpadded text at a time."""
    double = copy.deepcopy(model).double()
    total, tokens, per_text = 0.0, 0, []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            logprobs = torch.log_softmax(double(ids).logits[0, :-1], dim=-1)
            nll = -logprobs[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
            total += float(nll.sum())
            tokens += nll.numel()
            per_text.append(float(nll.mean()))
    return total / tokens, per_text


def test_lm_loss_within_1e_5_per_token_of_a_float64_reference(model, tokenizer):
    rng = random.Random(3)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(12)]
    expected, per_text = reference_losses(model, tokenizer, texts)
    result = LMLossEvaluator(texts, tokenizer, batch_size=5, max_length=64)(model)  # padded batches
    assert abs(result.metrics["loss"] - expected) < 1e-5
    assert abs(result.metrics["text_loss"] - sum(per_text) / len(per_text)) < 1e-5
    for text, loss in zip(texts, per_text, strict=True):  # each text alone: no averaging over texts hides an error
        alone = LMLossEvaluator([text], tokenizer, max_length=64)(model)
        assert abs(alone.metrics["loss"] - loss) < 1e-5, text


def test_each_tokens_cross_entropy_matches_float64_on_wide_logits() -> None:
    """Per token, not per text: float32 log-sum-exp over 49,152 logits drifts by up to ~2e-5 (seen on SmolLM2);
    the loss is taken in float64 so each token's value is within float32 rounding of the float64 reference."""
    from mergetune.objectives.evaluators.lm_loss import token_cross_entropy

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 70, VOCAB, generator=generator) * 6.0 + 4.0  # trained heads: std of several units
    targets = torch.randint(0, VOCAB, (3, 70), generator=generator)
    mask = (torch.rand(3, 70, generator=generator) > 0.2).float()
    got = token_cross_entropy(logits, targets, mask)
    reference = -torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[..., None])[..., 0]
    reference = torch.where(mask.bool(), reference, torch.zeros_like(reference))
    assert got.dtype == torch.float32 and bool((got[mask == 0] == 0).all())
    assert float((got.double() - reference).abs().max()) <= 2e-6  # float32 rounding of values around 30
