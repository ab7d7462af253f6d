"""Each benchmark's own answer normalisation and tokenisation, after Unicode NFC.

The official scripts differ in what they strip and how they split, and the same prediction scores
differently under each; every function here names the script whose behaviour it reproduces. None of
them word-segments Vietnamese: the OpenViVQA code base can run VnCoreNLP or pyvi before scoring (off by
default) and caption papers often do; we score syllables (whitespace tokens) so that no Java service or
segmenter model sits in the metric, and EVAL.md says so next to the published numbers.
"""

from __future__ import annotations

import re
import string
import unicodedata

# Python's string.punctuation: the ASCII set the VLSP (EVJVQA) and ViTextVQA scripts remove.
_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)
# OpenViVQA's preprocess_sentence: these characters become tokens of their own.
_OPENVIVQA_SPLIT = re.compile(r"""([!?:;,"'()\[\]/.\-$&*])""")
_CURLY_QUOTES = re.compile("[\u201c\u201d]")
# VLSP's Japanese test (hiragana, katakana, kanji, CJK punctuation): such answers are scored per character.
_JAPANESE = re.compile(
    "[\u3000-\u303f\u3040-\u309f\u30a0-\u30ff\uff00-\uffef\u4e00-\u9faf\u2605\u2606\u2190-\u2195\u203b]"
)


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", str(text))


def openvivqa_tokens(text: str) -> list[str]:
    """OpenViVQA (`data_utils/utils.py: preprocess_sentence`, no segmenter): lower-cased, curly quotes
    made straight, punctuation kept as separate tokens, split on whitespace."""
    text = _CURLY_QUOTES.sub('"', nfc(text).lower())
    return _OPENVIVQA_SPLIT.sub(r" \1 ", text).split()


def is_japanese(text: str) -> bool:
    return _JAPANESE.search(text) is not None


def evjvqa_tokens(text: str, reference: str) -> list[str]:
    """VLSP 2022 EVJVQA (`normalize_answer`): when the reference is Japanese, the characters of the text
    as they are; otherwise lower-cased, ASCII punctuation removed, split on whitespace."""
    text = nfc(text)
    if is_japanese(nfc(reference)):
        return list(text)
    return text.lower().translate(_ASCII_PUNCTUATION).split()


def vitextvqa_text(text: str) -> str:
    """ViTextVQA / ViOCRVQA (the authors' ViConsFormer `normalize_text` then `preprocess_sentence`):
    ASCII punctuation removed, lower-cased, ends stripped, curly quotes spaced out. Exact match compares
    these strings as they are (inner spaces included); F1 splits them on whitespace."""
    text = nfc(text).translate(_ASCII_PUNCTUATION).lower().strip()
    return _CURLY_QUOTES.sub(' " ', text)


def vivqa_answer(text: str) -> str:
    """ViVQA answers are class labels (the paper scores classification accuracy): lower-cased, any
    Unicode punctuation dropped, spaces collapsed, so "Màu đỏ." is the label "màu đỏ"."""
    kept = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in nfc(text).lower())
    return " ".join(kept.split())


def anls_text(text: str) -> str:
    """ST-VQA's ANLS: case-insensitive, surrounding and repeated whitespace ignored."""
    return " ".join(nfc(text).lower().split())


def caption_tokens(text: str) -> list[str]:
    """Caption scoring as coco-caption's PTBTokenizer leaves it: lower-cased words, punctuation tokens
    dropped. Any Unicode punctuation counts (the PTB list is ASCII); words are whitespace syllables."""
    kept = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in nfc(text).lower())
    return kept.split()
