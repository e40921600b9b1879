"""The zoo: real fine-tuned experts, built offline from a packaged base model and packaged corpora.

Why: demos, CI and benchmarks need real experts to merge (trained on real tasks, with real
classification heads, or real causal LMs), and nothing can be downloaded. A zoo is a named recipe for
building them: a base, a list of :class:`~mergetune.objectives.tasks.TaskConfig` and training settings.
:func:`build_zoo` fine-tunes one ``AutoModelForSequenceClassification`` per task from an encoder base,
or one ``AutoModelForCausalLM`` per ``lm`` / ``multiple_choice`` task from a causal-LM base
(:mod:`.causal`; a packaged GGUF model is dequantised once by :mod:`.gguf`), and returns a
:class:`Zoo` (base folder, expert folders, task configs, scores).

Built experts are cached under ``<cache>/zoo/<zoo>-<key>/<task>/`` (``<cache>`` is ``$MERGETUNE_CACHE``
or ``.cache``), where ``<key>`` hashes everything that changes the weights: the base, the
training settings, every task config and :data:`ZOO_FORMAT`. Each expert is written to a temporary
folder and renamed into place only once complete (weights, tokenizer and its ``zoo_expert.json``
record), so a killed build never leaves a folder that looks built; leftovers of dead builds are
removed on the next build.

Quality check: each expert's validation score on its own task, against the base encoder wearing
the same expert's head (:func:`head_on_base`), or against the base causal LM itself. An expert that
does not beat that by a clear margin has not learnt its task; the build logs both in a table and
writes them to ``manifest.json``. Scores come from the project's evaluators
(:mod:`mergetune.objectives.suite`, :mod:`.models`), so they are the numbers a search will compare
merged models against.

Modules, by concern: :mod:`.specs` (definitions, registry, cache key), :mod:`.results` (what a
build measured), :mod:`.cache` (atomic publishing, stale folders, records, manifest),
:mod:`.training` (fine-tuning and measuring one classifier; the shared optimiser loop),
:mod:`.causal` (one causal-LM expert), :mod:`.gguf` (packaged GGUF models as float32 folders),
:mod:`.build` (:func:`build_zoo`) and :mod:`.tables` (rich tables). This package re-exports their
public names.

The registry (:data:`ZOOS`): ``text8`` (8 real tasks on all-MiniLM-L6-v2, 7m46s measured on 2 shared
CPU cores, 1 thread), ``text4`` (4 tasks, cut down for CI and the demo, 2m19s) and ``tiny`` (a
random 2-layer, 32-wide BERT with MiniLM's tokenizer, experts trained a few steps on small
slices of real corpora: seconds, for unit tests); ``llm4`` (4 partial fine-tunes of
SmolLM2-135M-Instruct: BBC news and SMS text by LM loss, TREC question type and Rotten Tomatoes
sentiment as multiple choice) and ``llm-tiny`` (a random 2-block Llama with SmolLM2's tokenizer,
for CI).
"""

from mergetune.objectives.zoo.build import build_zoo, materialise_base, view_rows
from mergetune.objectives.zoo.cache import (
    BASE_RECORD,
    EXPERT_RECORD,
    MANIFEST,
    TMP_PREFIX,
    is_built,
    read_expert_result,
)
from mergetune.objectives.zoo.causal import train_causal_expert
from mergetune.objectives.zoo.results import ExpertResult, Zoo
from mergetune.objectives.zoo.specs import (
    CACHE_ENV,
    GGUF_MODELS,
    ZOO_FORMAT,
    ZOOS,
    ChoiceView,
    RandomBase,
    RandomLlama,
    TrainSettings,
    ZooError,
    ZooSpec,
    available_zoos,
    get_zoo,
    resolve_cache_dir,
)
from mergetune.objectives.zoo.tables import results_table, zoos_table
from mergetune.objectives.zoo.training import (
    accuracy,
    fine_tune,
    head_on_base,
    length_bucketed_batches,
    train_expert,
    warmup_decay,
)

__all__ = [
    "BASE_RECORD",
    "CACHE_ENV",
    "EXPERT_RECORD",
    "GGUF_MODELS",
    "MANIFEST",
    "TMP_PREFIX",
    "ZOOS",
    "ZOO_FORMAT",
    "ChoiceView",
    "ExpertResult",
    "RandomBase",
    "RandomLlama",
    "TrainSettings",
    "Zoo",
    "ZooError",
    "ZooSpec",
    "accuracy",
    "available_zoos",
    "build_zoo",
    "fine_tune",
    "get_zoo",
    "head_on_base",
    "is_built",
    "length_bucketed_batches",
    "materialise_base",
    "read_expert_result",
    "resolve_cache_dir",
    "results_table",
    "train_causal_expert",
    "train_expert",
    "view_rows",
    "warmup_decay",
    "zoos_table",
]
