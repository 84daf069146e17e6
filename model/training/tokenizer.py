"""A word-level tokenizer for the shapes vocabulary, built locally (no download).

Every word of the vocabulary is one token; any other word becomes `<|unknown|>`, so the
engine can tell the user which words the model cannot understand instead of silently
reading them as something else (a BPE tokenizer would split "cat" into known pieces).
It is saved as a `tokenizer.json` that `transformers.PreTrainedTokenizerFast` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffq.model.training.shapes_data import VOCABULARY

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unknown|>"
MAX_LENGTH = 32  # longest caption is 21 tokens with BOS/EOS


def build_tokenizer():
    """The shapes tokenizer as a transformers fast tokenizer (lowercases, splits words and punctuation)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0, EOS: 1, UNK: 2}
    for word in VOCABULARY:
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,  # as in CLIP: padding repeats end-of-text
        unk_token=UNK,
        model_max_length=MAX_LENGTH,
    )


def save_tokenizer(folder: str | Path) -> None:
    folder = Path(folder)
    build_tokenizer().save_pretrained(folder)
    # keep the folder small and deterministic: only what loading needs
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
