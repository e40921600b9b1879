"""Short answers of a causal LM: greedy decoding, answer extraction, then a normalised exact string match.

``exact_match = mean_i [ norm(extract(g_i)) in {norm(r) : r in refs_i} ]`` where ``g_i`` is the greedy
continuation of prompt ``i`` (cut at the first stop string), ``extract`` keeps its first non-empty
line and/or the match of ``answer_regex``, and ``norm`` is SQuAD's answer normalisation by default
(lower case, no punctuation, no articles, single spaces; :func:`normalize_answer`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.forward import Inputs, forward_params, scoring
from mergetune.objectives.evaluators.base import (
    CUSTOM_METRIC,
    DEFAULT_MAX_TOKENS,
    Batch,
    BatchCache,
    EvalResult,
    Outputs,
    Parts,
    Scorer,
    SlicedEvaluator,
    custom_score,
    pad_id,
    primary_metric,
    sliced_batches,
)
from mergetune.objectives.evaluators.causal import default_bos, encode_text, left_padded, prepend_bos
from mergetune.objectives.evaluators.kinds import NORMALIZE_STEPS

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str, steps: Iterable[str] = NORMALIZE_STEPS) -> str:
    """The text stripped, then the chosen ``steps`` in this order: ``lower`` case, remove ``punctuation``,
    remove ``articles`` (a, an, the), collapse ``whitespace`` to single spaces. All four: SQuAD's normalisation.
    """
    chosen = set(steps)
    unknown = chosen - set(NORMALIZE_STEPS)
    if unknown:
        raise ValueError(f"unknown normalisation step(s) {sorted(unknown)}; use {list(NORMALIZE_STEPS)}")
    if "lower" in chosen:
        text = text.lower()
    if "punctuation" in chosen:
        text = text.translate(_PUNCTUATION)
    if "articles" in chosen:
        text = _ARTICLES.sub(" ", text)
    if "whitespace" in chosen:
        text = " ".join(text.split())
    return text.strip()


def extract_answer(text: str, *, first_line: bool = True, pattern: re.Pattern[str] | None = None) -> str:
    """The answer in a generation: its first non-empty line (when ``first_line``), then the regex's match.

    With a pattern, the answer is its first group (the whole match when it has no group), '' when it
    does not match: an unparsable answer counts as wrong, never as another answer.
    """
    if first_line:
        text = next((line for line in text.splitlines() if line.strip()), "")
    if pattern is not None:
        found = pattern.search(text)
        if found is None:
            return ""
        text = found.group(1) if pattern.groups else found.group(0)
    return text


class ExactMatchEvaluator(SlicedEvaluator):
    """Short-answer accuracy of a causal LM: greedy decoding, then a normalised exact string match.

    Each prompt is decoded greedily (argmax, no sampling, no penalties; the model's generation config
    is ignored) for at most ``max_new_tokens`` tokens, stopping at EOS; the generation is the decoded
    text up to the first ``stop`` string (:meth:`generations`), its answer what :func:`extract_answer`
    keeps, compared to each acceptable answer after :func:`normalize_answer` with ``normalize`` steps.
    Prompts are batched by length, left-padded (position ids count from each prompt's first token),
    with a KV cache. ``metric`` is ``exact_match``, or ``custom`` with a ``scorer`` (it receives the
    extracted answers and the lists of acceptable answers). Sliced (``parts``, see
    :class:`~.base.SlicedEvaluator`), an example's value is its match (1) or miss (0).
    """

    def __init__(
        self,
        prompts: Sequence[str],
        answers: Sequence[str | Sequence[str]],
        tokenizer: Any,
        *,
        max_new_tokens: int = 16,
        stop: Sequence[str] = ("\n",),
        first_line: bool = True,
        answer_regex: str | None = None,
        normalize: Sequence[str] = NORMALIZE_STEPS,
        metric: str | None = None,
        scorer: Scorer | None = None,
        max_length: int = 256,
        batch_size: int = 32,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        autocast: torch.dtype | None = None,
        parts: Parts = None,
        name: str = "task",
    ) -> None:
        if not prompts or len(answers) != len(prompts):
            raise TaskError(f"task '{name}': need one answer (or list of answers) per prompt")
        self.name = name
        self.metric = primary_metric(name, metric, scorer, ("exact_match",))
        self.autocast = autocast
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)
        self.first_line = first_line
        try:
            self.pattern = None if answer_regex is None else re.compile(answer_regex)
            self.normalize = tuple(normalize)
            normalize_answer("", self.normalize)
        except (re.error, ValueError) as exc:
            raise TaskError(f"task '{name}': {exc}") from exc
        self.references = [[a] if isinstance(a, str) else list(a) for a in answers]
        self.answers = [{normalize_answer(x, self.normalize) for x in refs} for refs in self.references]
        bos = default_bos(tokenizer)
        ids = [prepend_bos(encode_text(tokenizer, p), bos)[-max_length:] for p in prompts]
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self._set_parts(parts)
        self.batches = BatchCache(
            [
                Batch(torch.as_tensor(rows), left_padded([ids[i] for i in rows], pad_id(tokenizer)), part=part)
                for part, rows in sliced_batches([len(x) for x in ids], batch_size, max_tokens, parts)
            ]
        )

    @property
    def n_examples(self) -> int:
        return len(self.answers)

    def generations(self, model: nn.Module) -> list[str]:
        """The decoded answer per prompt (cut at the first stop string), in prompt order."""
        outputs = self._new_outputs()
        with scoring(model, self.autocast):
            self._forward(model, self._batches_for(model), outputs)
        return outputs["texts"]

    def _new_outputs(self) -> Outputs:
        return {"texts": [""] * self.n_examples}

    def _forward(self, model: nn.Module, batches: Sequence[Batch], outputs: Outputs) -> None:
        texts = outputs["texts"]
        for batch in batches:
            new = self._greedy(model, batch.inputs)
            for row, tokens in zip(batch.rows.tolist(), new, strict=True):
                texts[row] = self._cut(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def _cut(self, text: str) -> str:
        for s in self.stop:
            if s and s in text:
                text = text[: text.index(s)]
        return text

    def _greedy(self, model: nn.Module, inputs: Inputs) -> list[list[int]]:
        """Greedy continuations (without EOS) of a left-padded batch, reusing the KV cache."""
        accepted = forward_params(model)
        use_cache = "past_key_values" in accepted and "use_cache" in accepted
        ids, mask, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
        new = [[] for _ in range(ids.shape[0])]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        step_ids, past = ids, None
        for _ in range(self.max_new_tokens):
            kwargs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": mask}
            if "position_ids" in accepted:
                kwargs["position_ids"] = positions if past is None or not use_cache else positions[:, -1:]
            if use_cache:
                kwargs.update(use_cache=True, past_key_values=past)
            if "logits_to_keep" in accepted:
                kwargs["logits_to_keep"] = 1
            out = model(**kwargs)
            token = out.logits[:, -1].argmax(-1)
            if self.eos is not None:
                done |= token == self.eos
            for i in (~done).nonzero().flatten().tolist():
                new[i].append(int(token[i]))
            if bool(done.all()) or self._all_stopped(new):
                break
            past = out.past_key_values if use_cache else None
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            step_ids = token.unsqueeze(-1) if use_cache else torch.cat([step_ids, token.unsqueeze(-1)], dim=1)
        return new

    def _all_stopped(self, new: list[list[int]]) -> bool:
        if not self.stop:
            return False
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return all(any(s and s in text for s in self.stop) for text in decoded)

    def extracted(self, generations: Sequence[str]) -> list[str]:
        """Each generation's answer (:func:`extract_answer`), not yet normalised."""
        return [extract_answer(g, first_line=self.first_line, pattern=self.pattern) for g in generations]

    def _summarise(self, outputs: Outputs, rows: np.ndarray) -> EvalResult:
        """Exact match over ``rows``; each example's value is its match (1) or miss (0)."""
        answers = self.extracted([outputs["texts"][i] for i in rows])
        accepted = [self.answers[i] for i in rows]
        hits = np.array([normalize_answer(a, self.normalize) in ok for a, ok in zip(answers, accepted, strict=True)])
        metrics = {"exact_match": float(np.mean(hits))}
        if self.scorer is not None:
            metrics[CUSTOM_METRIC] = custom_score(self.scorer, answers, [self.references[i] for i in rows], self.name)
        return EvalResult(self.metric, metrics[self.metric], metrics, len(rows), per_example=hits.astype(np.float64))
