"""Evaluators, task models and the validation suite against hand computations on tiny random models.

Every expected value is computed independently of the code under test: one example at a time,
without padding, with explicit loops (per-token ``log_softmax``, counting hits by hand) or with
scikit-learn's metrics. Tokenisers are word-level ``tokenizers`` objects built here, so nothing is
downloaded; their vocabularies fit the tiny models' 99 embeddings.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef

from mergetune.errors import TaskError
from mergetune.objectives.evaluators import (
    ClassificationEvaluator,
    EntropyEvaluator,
    ExactMatchEvaluator,
    LMLossEvaluator,
    MultipleChoiceEvaluator,
    length_batches,
    pooled_head_logits,
)
from mergetune.objectives.models import load_task_model, overwrite_shared, read_state_dict
from mergetune.objectives.normalization import normalization_of
from mergetune.objectives.splits import DedupReport
from mergetune.objectives.suite import SuiteScores, ValidationSuite
from mergetune.objectives.tasks import SplitData, TaskConfig, TaskData

WORDS = [f"w{i}" for i in range(95)]  # 4 specials + 95 words = the tiny models' 99 ids
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
LLAMA_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


# ---- tokenisers and data ---------------------------------------------------------------------


def word_tokenizer(specials: list[str], template: tuple[str, str] | None, **tokens: str) -> Any:
    """A whitespace word-level fast tokenizer over WORDS, with ``template`` (single, pair) post-processing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=tokens["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if template is not None:
        used = {t for t in specials if t in template[0] + template[1]}
        tok.post_processor = processors.TemplateProcessing(
            single=template[0], pair=template[1], special_tokens=[(t, vocab[t]) for t in sorted(used)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)


@pytest.fixture(scope="module")
def bert_tok() -> Any:
    """BERT-like: [CLS] a [SEP] (b [SEP]) with token type ids."""
    tok = word_tokenizer(
        BERT_SPECIALS,
        ("[CLS] $A [SEP]", "[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1"),
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    return tok


@pytest.fixture(scope="module")
def llama_tok() -> Any:
    """Llama-like: BOS first by default, EOS id 2, no pad token (the evaluators must cope)."""
    tok = word_tokenizer(LLAMA_SPECIALS, ("<s> $A", "<s> $A $B"), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def sentences(n: int, seed: int, lo: int = 1, hi: int = 12) -> list[str]:
    """``n`` random word sequences of varied lengths (so batches need padding)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def split(texts: list[str], labels: list[int] | None = None, pairs: list[str] | None = None, choices=None) -> SplitData:
    return SplitData(
        texts=tuple(texts),
        labels=None if labels is None else np.array(labels, dtype=np.int64),
        text_pairs=None if pairs is None else tuple(pairs),
        choices=choices,
    )


def make_task(name: str, num_labels: int, n: int, seed: int, kind: str = "classification") -> TaskData:
    """A hand-built TaskData: validation and test of different texts, random labels."""
    rng = random.Random(seed)
    labels = [f"l{i}" for i in range(num_labels)]
    config = TaskConfig(name=name, source=f"{name}.csv", kind=kind, labels=labels, max_length=32)
    val_texts, test_texts = sentences(n, seed), sentences(n + 2, seed + 1000)
    return TaskData(
        config=config,
        label_names=tuple(labels),
        train=split([], []),
        validation=split(val_texts, [rng.randrange(num_labels) for _ in val_texts]),
        test=split(test_texts, [rng.randrange(num_labels) for _ in test_texts]),
        dedup=DedupReport(0, 0, 0, 0, 0),
    )


def bert_expert(tiny_bert_dir, task: str) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir[1][task]).eval()


def llama(tiny_llama_dir, task: str = "math") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir[1][task]).eval()


def one_logits(model: torch.nn.Module, tok: Any, text: str, pair: str | None = None) -> torch.Tensor:
    """Logits of one example, unpadded, no batching."""
    enc = tok(text, pair, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[0]


def close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


# ---- classification --------------------------------------------------------------------------


def test_classification_matches_hand_count(tiny_bert_dir, bert_tok):
    model = bert_expert(tiny_bert_dir, "topic")  # 4 labels
    texts = sentences(23, seed=1)
    preds = [int(one_logits(model, bert_tok, t).argmax()) for t in texts]
    labels = [p if i % 3 else (p + 1) % 4 for i, p in enumerate(preds)]  # every third one wrong
    result = ClassificationEvaluator(texts, labels, bert_tok, num_labels=4, batch_size=5, metric="macro_f1")(model)
    hits = sum(p == y for p, y in zip(preds, labels, strict=True))
    assert result.metrics["accuracy"] == pytest.approx(hits / len(texts))
    assert result.metrics["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert result.metrics["mcc"] == pytest.approx(matthews_corrcoef(labels, preds))
    assert result.metric == "macro_f1" and result.score == result.metrics["macro_f1"]
    assert result.n_examples == 23


def test_classification_text_pairs(tiny_bert_dir, bert_tok):
    model = bert_expert(tiny_bert_dir, "mnli")  # 3 labels
    texts, pairs = sentences(11, seed=2), sentences(11, seed=3)
    preds = [int(one_logits(model, bert_tok, t, p).argmax()) for t, p in zip(texts, pairs, strict=True)]
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1]
    result = ClassificationEvaluator(texts, labels, bert_tok, text_pairs=pairs, num_labels=3, batch_size=4)(model)
    assert result.score == pytest.approx(sum(p == y for p, y in zip(preds, labels, strict=True)) / 11)
    assert bert_tok(texts[0], pairs[0])["token_type_ids"][-1] == 1  # the pair really is a second segment


def test_shared_head_label_columns_and_pooled_head(tiny_bert_dir, bert_tok):
    """One model serves several tasks: each task reads its own columns of a joint head, or its own pooled head."""
    model = bert_expert(tiny_bert_dir, "topic")
    texts, columns = sentences(9, seed=4), [3, 1]
    expected = [int(one_logits(model, bert_tok, t)[columns].argmax()) for t in texts]
    result = ClassificationEvaluator(texts, expected, bert_tok, num_labels=2, label_columns=columns)(model)
    assert result.score == 1.0

    from transformers import BertModel

    encoder = BertModel.from_pretrained(tiny_bert_dir[0]).eval()
    head = torch.nn.Linear(16, 3)
    with torch.no_grad():
        hand = []
        for t in texts:
            hidden = encoder(**bert_tok(t, return_tensors="pt")).last_hidden_state[0]
            hand.append(int(head(hidden.mean(0)).argmax()))
    pooled = ClassificationEvaluator(texts, hand, bert_tok, num_labels=3, logits_fn=pooled_head_logits(head))
    assert pooled(encoder).score == 1.0


def test_entropy_matches_formula(tiny_bert_dir, bert_tok):
    model = bert_expert(tiny_bert_dir, "mnli")
    texts = sentences(10, seed=5)
    entropies = []
    for t in texts:
        p = torch.softmax(one_logits(model, bert_tok, t).double(), -1)
        entropies.append(-sum(float(pi) * math.log(float(pi)) for pi in p))
    result = EntropyEvaluator(texts, bert_tok, num_labels=3, batch_size=3)(model)
    assert result.metric == "neg_entropy"
    assert result.score == pytest.approx(-np.mean(entropies), rel=1e-5)
    assert result.metrics["normalized_entropy"] == pytest.approx(np.mean(entropies) / math.log(3), rel=1e-5)


# ---- causal LMs ------------------------------------------------------------------------------


def option_loglik(model: torch.nn.Module, context_ids: list[int], option_ids: list[int]) -> float:
    """Sum over the option's tokens of log p(token | everything before it), one token at a time."""
    ids = context_ids + option_ids
    total = 0.0
    with torch.no_grad():
        for k in range(len(context_ids), len(ids)):
            logits = model(torch.tensor([ids[:k]])).logits[0, -1]
            total += float(torch.log_softmax(logits.double(), -1)[ids[k]])
    return total


def mc_data(n: int, seed: int) -> tuple[list[str], list[tuple[str, ...]], list[int]]:
    rng = random.Random(seed)
    contexts = sentences(n, seed, lo=2, hi=9)
    choices = [
        tuple(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(2, 4)))
        for _ in contexts
    ]
    labels = [rng.randrange(len(c)) for c in choices]
    return contexts, choices, labels


def test_multiple_choice_matches_token_loop(tiny_llama_dir, llama_tok):
    model = llama(tiny_llama_dir)
    contexts, choices, labels = mc_data(8, seed=6)
    evaluator = MultipleChoiceEvaluator(contexts, choices, labels, llama_tok, batch_size=5)
    bos, vocab = 1, llama_tok.get_vocab()
    expected = [
        option_loglik(model, [bos] + [vocab[w] for w in c.split()], [vocab[w] for w in o.split()])
        for c, opts in zip(contexts, choices, strict=True)
        for o in opts
    ]
    got = evaluator.loglikelihoods(model)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    result = evaluator(model)
    it = iter(expected)
    acc = acc_norm = 0
    for opts, y in zip(choices, labels, strict=True):
        ll = [next(it) for _ in opts]
        acc += int(np.argmax(ll)) == y
        acc_norm += int(np.argmax([v / len(o) for v, o in zip(ll, opts, strict=True)])) == y
    assert result.metrics["accuracy"] == pytest.approx(acc / 8)
    assert result.metrics["acc_norm"] == pytest.approx(acc_norm / 8)
    assert result.score == result.metrics["accuracy"]


def test_lm_loss_is_token_weighted_mean_of_model_loss(tiny_llama_dir, llama_tok):
    model = llama(tiny_llama_dir)
    texts = sentences(9, seed=7, lo=2, hi=15)
    losses, counts = [], []
    with torch.no_grad():
        for t in texts:
            ids = llama_tok(t, return_tensors="pt")["input_ids"]
            losses.append(float(model(ids, labels=ids).loss))
            counts.append(ids.shape[1] - 1)
    expected = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
    result = LMLossEvaluator(texts, llama_tok, batch_size=4)(model)
    assert result.metric == "neg_loss" and result.score == pytest.approx(-expected, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.metrics["text_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert result.metrics["n_tokens"] == sum(counts)


def test_exact_match_greedy(tiny_llama_dir, llama_tok):
    model = llama(tiny_llama_dir)
    prompts = sentences(7, seed=8, lo=1, hi=8)
    vocab = llama_tok.get_vocab()
    greedy = []
    with torch.no_grad():
        for p in prompts:
            ids, new = [1] + [vocab[w] for w in p.split()], []
            for _ in range(3):  # no cache, no padding: the whole sequence again at every step
                token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                if token == 2:
                    break
                ids.append(token)
                new.append(token)
            greedy.append(llama_tok.decode(new, skip_special_tokens=True))
    answers = [g if i % 2 == 0 else [g + " w0 w0", "nothing"] for i, g in enumerate(greedy)]
    evaluator = ExactMatchEvaluator(prompts, answers, llama_tok, max_new_tokens=3, stop=(), batch_size=3)
    assert evaluator.generations(model) == greedy
    assert evaluator(model).score == pytest.approx(4 / 7)


# ---- invariance and side effects -------------------------------------------------------------


def permuted(values: list[Any], order: list[int]) -> list[Any]:
    return [values[i] for i in order]


def test_batch_size_token_budget_and_order_do_not_change_scores(tiny_bert_dir, tiny_llama_dir, bert_tok, llama_tok):
    bert, lm = bert_expert(tiny_bert_dir, "mnli"), llama(tiny_llama_dir)
    texts, labels = sentences(17, seed=9), [i % 3 for i in range(17)]
    contexts, choices, mc_labels = mc_data(9, seed=10)
    order = list(range(17))
    random.Random(0).shuffle(order)
    mc_order = list(range(9))
    random.Random(1).shuffle(mc_order)

    def runs(batch_size: int, max_tokens: int | None, o: list[int], mo: list[int]) -> list[Any]:
        sizes = {"batch_size": batch_size, "max_tokens": max_tokens}
        cls = ClassificationEvaluator(permuted(texts, o), permuted(labels, o), bert_tok, num_labels=3, **sizes)
        ent = EntropyEvaluator(permuted(texts, o), bert_tok, **sizes)
        mc = MultipleChoiceEvaluator(
            permuted(contexts, mo), permuted(choices, mo), permuted(mc_labels, mo), llama_tok, **sizes
        )
        pairs = [(i, j) for i in mo for j in range(len(choices[i]))]  # the evaluator's pair order
        loglik = dict(zip(pairs, mc.loglikelihoods(lm), strict=True))
        loss = LMLossEvaluator(permuted(texts, o), llama_tok, **sizes)
        return [cls(bert).metrics, ent(bert).score, [loglik[k] for k in sorted(loglik)], mc(lm).metrics, loss(lm).score]

    identity, mc_identity = list(range(17)), list(range(9))
    reference = runs(64, None, identity, mc_identity)
    settings = ((1, None, identity, mc_identity), (4, None, order, mc_order), (64, 20, order[::-1], mc_order))
    for batch_size, max_tokens, o, mo in settings:
        got = runs(batch_size, max_tokens, o, mo)
        assert got[0] == pytest.approx(reference[0])
        assert got[1] == pytest.approx(reference[1], rel=1e-5)
        np.testing.assert_allclose(got[2], reference[2], rtol=1e-5, atol=1e-5)
        assert got[3] == pytest.approx(reference[3])
        assert got[4] == pytest.approx(reference[4], rel=1e-5)


def test_length_batches_respect_sizes_and_budget():
    rng = random.Random(3)
    lengths = [rng.randint(1, 40) for _ in range(100)]
    for batch_size, max_tokens in ((8, None), (64, 100), (64, 30)):
        batches = length_batches(lengths, batch_size, max_tokens)
        assert sorted(i for b in batches for i in b) == list(range(100))
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(lengths, reverse=True)  # longest first: similar lengths share a batch
        for b in batches:
            padded = len(b) * max(lengths[i] for i in b)
            assert len(b) <= batch_size and (max_tokens is None or padded <= max_tokens or len(b) == 1)


def test_scoring_leaves_model_unchanged_and_runs_in_inference_mode(tiny_bert_dir, bert_tok):
    model = bert_expert(tiny_bert_dir, "mnli")
    model.train()  # the caller's mode is restored; dropout is off while scoring
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[tuple[bool, bool]] = []
    model.register_forward_hook(lambda m, i, o: seen.append((torch.is_inference_mode_enabled(), m.training)))
    texts = sentences(6, seed=11)
    evaluator = ClassificationEvaluator(texts, [0] * 6, bert_tok, num_labels=3, batch_size=4)
    first, second = evaluator(model), evaluator(model)
    assert first == second  # deterministic: no dropout
    assert seen and all(inference and not training for inference, training in seen)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_autocast_and_bfloat16_weights(tiny_bert_dir, bert_tok):
    """Faster precisions run the same evaluator: forwards under autocast, or a bfloat16 task model."""
    model = bert_expert(tiny_bert_dir, "mnli")
    texts = sentences(8, seed=15)
    seen: list[bool] = []
    model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    exact = EntropyEvaluator(texts, bert_tok)(model).score
    fast = EntropyEvaluator(texts, bert_tok, autocast=torch.bfloat16)(model).score
    assert seen == [False, True] and fast == pytest.approx(exact, rel=0.05)
    task = make_task("mnli", 3, 4, seed=16)
    model16 = load_task_model(task, tiny_bert_dir[1]["mnli"], dtype=torch.bfloat16)
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    assert EntropyEvaluator(texts, bert_tok)(model16).score == pytest.approx(exact, rel=0.05)


# ---- task models -----------------------------------------------------------------------------


def test_head_size_mismatch_names_the_task(tiny_bert_dir, bert_tok):
    task = make_task("sentiment", num_labels=2, n=4, seed=12)
    with pytest.raises(TaskError, match=r"task 'sentiment'.*2 labels.*3 outputs"):
        load_task_model(task, tiny_bert_dir[1]["mnli"])
    with pytest.raises(TaskError, match=r"task 'sentiment'.*3 outputs.*2 labels"):
        ClassificationEvaluator(["w1"], [0], bert_tok, num_labels=2, name="sentiment")(
            bert_expert(tiny_bert_dir, "mnli")
        )
    with pytest.raises(TaskError, match="task 'sentiment'"):
        ValidationSuite([task], bert_tok).score({"sentiment": bert_expert(tiny_bert_dir, "mnli")})


def test_load_task_model_refuses_a_folder_without_the_head(tiny_bert_dir):
    with pytest.raises(TaskError, match=r"task 'sst2'.*lacks.*classifier"):
        load_task_model(make_task("sst2", 2, 4, seed=13), tiny_bert_dir[0])


def test_load_task_model_classes_and_shared_base(tiny_bert_dir, tiny_llama_dir):
    task = make_task("sst2", 2, 4, seed=14)
    expert = load_task_model(task.config, tiny_bert_dir[1]["sst2"])
    assert type(expert).__name__ == "BertForSequenceClassification" and not expert.training
    mixed = load_task_model(task, tiny_bert_dir[1]["sst2"], shared_from=tiny_bert_dir[0])
    base = read_state_dict(tiny_bert_dir[0])
    state = mixed.state_dict()
    assert all(torch.equal(state["bert." + k], v) for k, v in base.items())
    assert torch.equal(state["classifier.weight"], expert.state_dict()["classifier.weight"])
    assert not torch.equal(state["bert.pooler.dense.weight"], expert.state_dict()["bert.pooler.dense.weight"])
    lm_task = TaskConfig(name="wiki", source="wiki.csv", kind="lm")
    lm = load_task_model(lm_task, tiny_llama_dir[1]["code"], shared_from=llama(tiny_llama_dir, "math").state_dict())
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert torch.equal(lm.lm_head.weight, llama(tiny_llama_dir, "math").lm_head.weight)


def _mapped_files() -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split(maxsplit=5)) == 6}


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's memory maps (Linux /proc)")
def test_a_sharded_base_folder_is_copied_one_tensor_at_a_time_with_no_file_mapped(tmp_path):
    """The base reference model (the expert's model with the base's weights) must not hold the whole base
    beside the model: on SmolLM2 the base's file stayed mapped and resident (0.5 GB) during the references."""
    import tracemalloc

    from safetensors.torch import save_file
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(5)
        expert_model, base_model = LlamaForCausalLM(config), LlamaForCausalLM(config)
    expert_model.save_pretrained(tmp_path / "expert")
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    names = sorted(base)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    (tmp_path / "base").mkdir()
    for file, part in shards.items():
        save_file({n: base[n] for n in part}, str(tmp_path / "base" / file), metadata={"format": "pt"})
    weight_map = {n: file for file, part in shards.items() for n in part}
    (tmp_path / "base" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    base_files = {str((tmp_path / "base" / file).resolve()) for file in shards}
    sizes = [v.numel() * v.element_size() for v in base.values()]
    slack = 128 * 1024  # the copy's own bookkeeping (state dict, headers, names): about 70 KiB measured
    assert sum(sizes) - max(sizes) > 4 * slack  # holding the whole base would show

    held, mapped = [], []

    class OnCopy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default:
                held.append((tracemalloc.get_traced_memory()[0] - start, args[1].numel() * args[1].element_size()))
                mapped.append(base_files & _mapped_files())
            return func(*args, **(kwargs or {}))

    model = load_task_model(TaskConfig(name="wiki", source="wiki.csv", kind="lm"), tmp_path / "expert")
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    try:
        with OnCopy():
            overwrite_shared(model, tmp_path / "base", task_name="wiki")  # what shared_from= runs
    finally:
        tracemalloc.stop()
    state = model.state_dict()
    assert all(torch.equal(state[n], base[n]) for n in names)  # every tensor is the base's, from either shard
    assert len(held) >= len(names) and not any(mapped)
    assert all(now <= size + slack for now, size in held), held


# ---- the suite -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_tasks() -> list[TaskData]:
    return [make_task("sst2", 2, 14, seed=20), make_task("mnli", 3, 11, seed=21), make_task("topic", 4, 9, seed=22)]


def test_suite_normalised_mean_and_worst(tiny_bert_dir, bert_tok, bert_tasks):
    experts = {t.name: bert_expert(tiny_bert_dir, t.name) for t in bert_tasks}
    merged = {t.name: load_task_model(t, tiny_bert_dir[1][t.name], shared_from=tiny_bert_dir[0]) for t in bert_tasks}
    suite = ValidationSuite(bert_tasks, bert_tok, batch_size=4)

    def hand_accuracy(model: torch.nn.Module, task: TaskData) -> float:
        preds = [int(one_logits(model, bert_tok, t).argmax()) for t in task.validation.texts]
        return sum(p == y for p, y in zip(preds, task.validation.labels, strict=True)) / len(preds)

    ref = {t.name: hand_accuracy(experts[t.name], t) for t in bert_tasks}
    raw = {t.name: hand_accuracy(merged[t.name], t) for t in bert_tasks}
    assert all(v > 0 for v in ref.values())  # a zero reference would make the ratio undefined
    unnormalised = suite.score(merged)
    assert unnormalised.scores == pytest.approx(raw) and unnormalised.mean_normalized is None

    reference = suite.reference_scores(experts)
    assert reference.scores == pytest.approx(ref) and reference.normalized == pytest.approx(dict.fromkeys(ref, 1.0))
    scores = suite.score(merged)
    normalised = {k: raw[k] / ref[k] for k in raw}
    assert scores.normalized == pytest.approx(normalised)
    assert scores.mean_normalized == pytest.approx(sum(normalised.values()) / 3)
    assert scores.worst_normalized == pytest.approx(min(normalised.values()))
    assert all(
        t.seconds > 0 and t.n_examples == len(bert_tasks[i].validation) for i, t in enumerate(scores.tasks.values())
    )
    assert SuiteScores.from_dict(scores.to_dict()) == scores


def test_suite_one_shared_model_with_label_columns(tiny_bert_dir, bert_tok, bert_tasks):
    """One module for every task: each task reads its own columns of the joint 4-output head."""
    model = bert_expert(tiny_bert_dir, "topic")
    columns = {"sst2": [0, 1], "mnli": [1, 2, 3]}
    suite = ValidationSuite(
        bert_tasks[:2], bert_tok, task_options={k: {"label_columns": v} for k, v in columns.items()}
    )
    scores = suite.score(model)
    for task in bert_tasks[:2]:
        preds = [int(one_logits(model, bert_tok, t)[columns[task.name]].argmax()) for t in task.validation.texts]
        hits = sum(p == y for p, y in zip(preds, task.validation.labels, strict=True))
        assert scores.tasks[task.name].score == pytest.approx(hits / len(preds))


def test_suite_max_examples_and_set_reference(tiny_bert_dir, bert_tok, bert_tasks):
    suite = ValidationSuite(bert_tasks[:1], bert_tok, max_examples=5)
    suite.set_reference({"sst2": 0.5})
    model = bert_expert(tiny_bert_dir, "sst2")
    result = suite.score({"sst2": model}).tasks["sst2"]
    assert result.n_examples == 5 and result.normalized == pytest.approx(result.score / 0.5)
    with pytest.raises(TaskError, match=r"task 'sst2'.*reference"):
        suite.set_reference({"sst2": 0.0})


def test_normalised_negated_losses():
    """Losses: the share of the expert's gain over the base kept (no longer expert loss / merged loss)."""
    loss = normalization_of("lm", "neg_loss", None, has_expert=True)
    assert loss.apply(-2.5, expert=-1.0, base=-3.0) == pytest.approx(0.25)  # kept 0.5 of the 2.0 gained
    entropy = normalization_of("u", "neg_entropy", None, has_expert=True)
    assert entropy.apply(-0.5, expert=-1.0, base=-2.0) == pytest.approx(1.5)  # better than the expert
    accuracy = normalization_of("a", "accuracy", None, has_expert=True)
    assert accuracy.apply(0.6, expert=0.8) == pytest.approx(0.75)


def count_forwards(models: dict[str, torch.nn.Module]) -> list[str]:
    calls: list[str] = []
    for name, model in models.items():
        model.register_forward_hook(lambda *_, name=name: calls.append(name))
    return calls


def test_reference_cache_in_memory_and_on_disk(tiny_bert_dir, bert_tok, bert_tasks, tmp_path: Path):
    experts = {t.name: bert_expert(tiny_bert_dir, t.name) for t in bert_tasks}
    calls = count_forwards(experts)
    suite = ValidationSuite(bert_tasks, bert_tok, cache_dir=tmp_path)
    first = suite.reference_scores(experts)
    assert sorted(set(calls)) == ["mnli", "sst2", "topic"]
    calls.clear()
    assert suite.reference_scores(experts).scores == first.scores and calls == []  # memory
    assert not list(tmp_path.iterdir())  # modules alone are never written to disk

    dirs = {t.name: tiny_bert_dir[1][t.name] for t in bert_tasks}
    loads: list[str] = []

    def loader(task: TaskData, folder: Any) -> torch.nn.Module:
        loads.append(task.name)
        return experts[task.name]

    suite.reference_scores(dirs, loader=loader)
    assert len(list(tmp_path.glob("reference-*.json"))) == 1 and sorted(loads) == ["mnli", "sst2", "topic"]
    calls.clear()
    loads.clear()
    fresh = ValidationSuite(bert_tasks, bert_tok, cache_dir=tmp_path)  # a new worker: disk cache
    cached = fresh.reference_scores(dirs, loader=loader)
    assert calls == [] and loads == [] and cached.scores == first.scores
    assert fresh.reference == pytest.approx(first.scores)
    other = ValidationSuite(bert_tasks, bert_tok, cache_dir=tmp_path, max_examples=5)  # other examples: other key
    other.reference_scores(dirs, loader=loader)
    assert sorted(loads) == ["mnli", "sst2", "topic"]


def test_test_split_only_through_an_explicit_call(tiny_bert_dir, bert_tok, bert_tasks):
    with pytest.raises(TaskError, match="for_test"):
        ValidationSuite(bert_tasks, bert_tok, split="test")
    validation = ValidationSuite(bert_tasks, bert_tok)
    assert validation.split == "validation"
    assert all(
        ev.n_examples == len(t.validation) for ev, t in zip(validation.evaluators.values(), bert_tasks, strict=True)
    )
    test = ValidationSuite.for_test(bert_tasks, bert_tok)
    models = {t.name: bert_expert(tiny_bert_dir, t.name) for t in bert_tasks}
    scores = test.score(models)
    assert scores.split == "test"
    assert [s.n_examples for s in scores.tasks.values()] == [len(t.test) for t in bert_tasks]
