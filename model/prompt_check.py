"""Tell the user which parts of a prompt the text encoder never sees.

Two things silently weaken a prompt in a diffusers pipeline:

1. Words the tokenizer does not know. A word-level tokenizer (like the one of
   the bundled "shapes" model) maps them to its unknown token, which may be a
   token of its own ("<unk>") or shared with end-of-text ("<|endoftext|>", as
   CLIP's tokenizer declares it). Real CLIP byte-level BPE tokenizers never
   produce it, so for them no word is ever reported.
2. Tokens past the tokenizer's `model_max_length` (77 for CLIP): the pipeline
   cuts them off.

Both are reported as human-readable warnings that quote the prompt's own
words, as the tokenizer splits them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple

_WHITESPACE_WORD = re.compile(r"\S+")

#: A tokenizer reporting a larger `model_max_length` than this has no real
#: limit (transformers uses 1e30 for "unset").
_NO_LIMIT = 1_000_000


def prompt_warnings(tokenizers: Iterable[Any], prompt: str, negative_prompt: str = "") -> list[str]:
    """Warnings for `prompt` and `negative_prompt` from every tokenizer of a pipeline.

    SDXL has two tokenizers; a warning both would give is reported once.
    """
    warnings: list[str] = []
    for tokenizer in tokenizers:
        for label, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            if not text:
                continue
            of = "" if label == "prompt" else f" of the {label}"
            for word in unknown_words(tokenizer, text):
                warnings.append(f"word {word!r}{of} is not in the model's vocabulary and was ignored")
            lost = truncated_text(tokenizer, text)
            if lost:
                limit = tokenizer.model_max_length
                warnings.append(f"{label} truncated after {limit} tokens; this part was ignored: {lost!r}")
    return list(dict.fromkeys(warnings))


def unknown_words(tokenizer: Any, text: str) -> list[str]:
    """Words of `text` that the tokenizer maps (in part) to its unknown token, in order, once each."""
    unknown_ids = _unknown_token_ids(tokenizer)
    literal_special = set(tokenizer.all_special_tokens)
    found = [
        word.text
        for word in _words(tokenizer, text)
        if unknown_ids.intersection(word.ids) and word.text not in literal_special
    ]
    return list(dict.fromkeys(found))


def truncated_text(tokenizer: Any, text: str) -> str:
    """The end of `text` that falls past the tokenizer's length limit ("" if none), from a word start."""
    max_length = tokenizer.model_max_length
    if not max_length or max_length > _NO_LIMIT:
        return ""
    # Room for the prompt's own tokens once <start>/<end> tokens are added.
    budget = max_length - len(tokenizer("", add_special_tokens=True)["input_ids"])
    used = 0
    for word in _words(tokenizer, text):
        used += len(word.ids)
        if used > budget:
            return text[word.start :].strip()
    return ""


class _Word(NamedTuple):
    text: str
    start: int  # character offset in the prompt
    ids: list[int]


def _words(tokenizer: Any, text: str) -> list[_Word]:
    """The prompt's words as the tokenizer splits them, each with its token ids (no special tokens).

    Fast tokenizers know which pre-tokenized word each token came from, so
    "zebra," is "zebra" (one unknown character is enough to flag it) and ","
    (judged on its own). Other tokenizers get whitespace-separated words.
    """
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, verbose=False)
        ids_by_word: dict[int, list[int]] = {}
        for token_id, word_index in zip(encoding["input_ids"], encoding.word_ids(), strict=True):
            if word_index is not None:
                ids_by_word.setdefault(word_index, []).append(token_id)
        spans = {index: encoding.word_to_chars(index) for index in ids_by_word}
        return [_Word(text[spans[i].start : spans[i].end], spans[i].start, ids) for i, ids in ids_by_word.items()]
    matches = list(_WHITESPACE_WORD.finditer(text))
    if not matches:
        return []
    encoded = tokenizer([match.group() for match in matches], add_special_tokens=False, verbose=False)["input_ids"]
    return [_Word(match.group(), match.start(), ids) for match, ids in zip(matches, encoded, strict=True)]


def _unknown_token_ids(tokenizer: Any) -> set[int]:
    """Ids that stand for "not in the vocabulary" in tokenized prompt text.

    Besides the declared unknown token, a tokenizer may map unknown words to
    its end-of-text or start-of-text token (which never occur inside a
    prompt's own tokens otherwise). Padding is not included: SDXL's second
    tokenizer pads with "!", which is an ordinary word there.
    """
    ids: set[int | None] = {tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    backend_unk = getattr(getattr(backend, "model", None), "unk_token", None)
    if backend is not None and backend_unk is not None:
        ids.add(backend.token_to_id(backend_unk))
    return {token_id for token_id in ids if token_id is not None}
