"""Do the base and an expert tokenise text the same way?

Task vectors are only meaningful when row i of every embedding means the same token in every
model. The shape check catches a different vocabulary *size*; this module catches the rest from the
tokenizer files alone (no tokenizer is instantiated, nothing is downloaded): a vocabulary with the
same size but other tokens or ids, other special tokens (BOS/EOS/PAD/..., added tokens), or another
normaliser / pre-tokeniser (lower-casing, accent stripping, byte-level splitting).

A folder without tokenizer files (an expert saved with ``save_pretrained`` of the model only) has
nothing to compare and passes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)
NORMALISER_KEYS = ("do_lower_case", "strip_accents", "tokenize_chinese_chars", "do_basic_tokenize")
VOCAB_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
# the files ``fingerprint`` reads: byte-identical ones need no parsing
FINGERPRINT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", *VOCAB_FILES)
MAX_EXAMPLES = 3


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _token_text(value: Any) -> Any:
    """A special token as its text: tokenizer configs store either a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content", value)
    if isinstance(value, list):
        return [_token_text(v) for v in value]
    return value


def _vocabulary(folder: Path, fast: dict[str, Any] | None) -> dict[str, int] | str | None:
    """token -> id from tokenizer.json (WordPiece/BPE/Unigram), else a digest of the vocabulary files."""
    model = (fast or {}).get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        return {str(k): int(v) for k, v in vocab.items()}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
        return {str(entry[0]): i for i, entry in enumerate(vocab)}
    digest = hashlib.sha256()
    found = False
    for name in VOCAB_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
            found = True
    return digest.hexdigest() if found else None


def fingerprint(folder: Path) -> dict[str, Any] | None:
    """What defines a folder's tokenisation, or None when it holds no tokenizer files."""
    fast = _read_json(folder / "tokenizer.json")
    config = _read_json(folder / "tokenizer_config.json") or {}
    special_map = _read_json(folder / "special_tokens_map.json") or {}
    vocabulary = _vocabulary(folder, fast)
    if vocabulary is None and fast is None and not config and not special_map:
        return None
    special = {k: _token_text(special_map.get(k, config.get(k))) for k in SPECIAL_KEYS}
    added = sorted(
        (t.get("id"), t.get("content"), bool(t.get("special"))) for t in (fast or {}).get("added_tokens", [])
    )
    normaliser = {k: config.get(k) for k in NORMALISER_KEYS}
    if fast is not None:
        normaliser |= {"normalizer": fast.get("normalizer"), "pre_tokenizer": fast.get("pre_tokenizer")}
    return {"vocabulary": vocabulary, "special tokens": special, "added tokens": added, "normaliser": normaliser}


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _vocabulary_difference(base: dict[str, int] | str | None, other: dict[str, int] | str | None) -> str | None:
    if base is None or other is None or base == other:
        return None
    if isinstance(base, dict) and isinstance(other, dict):
        changed = sorted(t for t in base.keys() | other.keys() if base.get(t) != other.get(t))
        examples = ", ".join(f"{t!r}: {base.get(t)} vs {other.get(t)}" for t in changed[:MAX_EXAMPLES])
        return f"vocabulary: {len(changed)} token(s) with another id or missing (base vs expert: {examples})"
    return "vocabulary files differ"


def _field_differences(part: str, base: dict[str, Any], other: dict[str, Any]) -> Iterable[str]:
    for key in sorted(base.keys() | other.keys()):
        if base.get(key) != other.get(key):
            yield f"{part} '{key}': {_short(base.get(key))} vs {_short(other.get(key))}"


def _same_files(a: Path, b: Path) -> bool:
    """Whether two folders hold byte-identical tokenizer files (the usual case: parsing them is then moot)."""
    for name in FINGERPRINT_FILES:
        pa, pb = a / name, b / name
        if pa.is_file() != pb.is_file() or (pa.is_file() and pa.read_bytes() != pb.read_bytes()):
            return False
    return True


def tokenizer_differences(base_folder: Path, expert_folder: Path) -> list[str]:
    """Human-readable differences between two folders' tokenisation (empty: same, or nothing to compare)."""
    if _same_files(base_folder, expert_folder):
        return []
    base, other = fingerprint(base_folder), fingerprint(expert_folder)
    if base is None or other is None:
        return []
    found = []
    vocabulary = _vocabulary_difference(base["vocabulary"], other["vocabulary"])
    if vocabulary:
        found.append(vocabulary)
    found += _field_differences("special token", base["special tokens"], other["special tokens"])
    if base["added tokens"] != other["added tokens"]:
        missing = sorted(set(base["added tokens"]) ^ set(other["added tokens"]))
        found.append(f"added tokens differ: {_short(missing[:MAX_EXAMPLES])}")
    found += _field_differences("normaliser", base["normaliser"], other["normaliser"])
    return found
