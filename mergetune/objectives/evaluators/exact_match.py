"""Short answers of a causal LM: greedy decoding, then a SQuAD-normalised exact string match."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.forward import Inputs, forward_params, scoring
from mergetune.objectives.evaluators.base import (
    DEFAULT_MAX_TOKENS,
    Batch,
    BatchCache,
    EvalResult,
    Evaluator,
    length_batches,
    pad_id,
)
from mergetune.objectives.evaluators.causal import adds_bos, encode_text, left_padded

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


class ExactMatchEvaluator(Evaluator):
    """Short-answer accuracy of a causal LM: greedy decoding, then a normalised exact string match.

    Each prompt is decoded greedily (argmax, no sampling, no penalties; the model's generation config
    is ignored) for at most ``max_new_tokens`` tokens, stopping at EOS; the answer is the decoded
    text up to the first ``stop`` string, compared to each acceptable answer after
    :func:`normalize_answer`. Prompts are batched, left-padded, with a KV cache.
    """

    metric = "exact_match"

    def __init__(
        self,
        prompts: Sequence[str],
        answers: Sequence[str | Sequence[str]],
        tokenizer: Any,
        *,
        max_new_tokens: int = 16,
        stop: Sequence[str] = ("\n",),
        max_length: int = 256,
        batch_size: int = 32,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        autocast: torch.dtype | None = None,
        name: str = "task",
    ) -> None:
        if not prompts or len(answers) != len(prompts):
            raise TaskError(f"task '{name}': need one answer (or list of answers) per prompt")
        self.name = name
        self.autocast = autocast
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)
        self.answers = [
            {normalize_answer(a)} if isinstance(a, str) else {normalize_answer(x) for x in a} for a in answers
        ]
        bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        ids = [(bos + encode_text(tokenizer, p))[-max_length:] for p in prompts]
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.batches = BatchCache(
            [
                Batch(torch.as_tensor(rows), left_padded([ids[i] for i in rows], pad_id(tokenizer)))
                for rows in length_batches([len(x) for x in ids], batch_size, max_tokens)
            ]
        )

    @property
    def n_examples(self) -> int:
        return len(self.answers)

    def generations(self, model: nn.Module) -> list[str]:
        """The decoded answer per prompt (cut at the first stop string), in prompt order."""
        texts = [""] * self.n_examples
        with scoring(model, self.autocast):
            for batch in self._batches_for(model):
                new = self._greedy(model, batch.inputs)
                for row, tokens in zip(batch.rows.tolist(), new, strict=True):
                    texts[row] = self._cut(self.tokenizer.decode(tokens, skip_special_tokens=True))
        return texts

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

    def _evaluate(self, model: nn.Module) -> EvalResult:
        generated = self.generations(model)
        hits = [normalize_answer(g) in ok for g, ok in zip(generated, self.answers, strict=True)]
        score = float(np.mean(hits))
        return EvalResult(self.metric, score, {"exact_match": score}, self.n_examples)
