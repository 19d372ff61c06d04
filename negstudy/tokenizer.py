"""Word-level CLIP tokenizers built locally, without the hub.

The shipped shapes model and the tiny test models need a real `CLIPTokenizer` that
loads with `from_pretrained`, like any Stable Diffusion checkpoint's tokenizer. A BPE
vocabulary is generated from a word list: every byte-level character (with and without
the end-of-word marker) is a token, and for each listed word a chain of left-to-right
merges builds the whole word into one token. Listed words therefore encode to exactly
one token each; any other text still encodes, character by character, never to UNK.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

EOW = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer in which every word of `words` (lowercase ASCII) is one token."""
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + EOW for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[str] = set()
    for word in sorted(set(words)):
        if not word.isascii() or not word.isalpha() or word != word.lower():
            raise ValueError(f"tokenizer word {word!r}: must be lowercase ASCII letters")
        pieces = list(word[:-1]) + [word[-1] + EOW]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in seen:
                seen.add(merged)
                merges.append((left, right))
                vocab.setdefault(merged, len(vocab))
            left = merged
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_clip_tokenizer(words: list[str], directory: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    tokenizer = build_clip_tokenizer(words, model_max_length)
    tokenizer.save_pretrained(str(directory))
    return tokenizer
