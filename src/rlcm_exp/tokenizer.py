"""An offline CLIP tokenizer over a small closed vocabulary.

No hub is reachable here, so tiny and toy models get a real `CLIPTokenizer` built from files we
write ourselves: the 256 byte symbols (and their end-of-word forms) plus BPE merges chosen so
that every vocabulary word is exactly one token. Unknown words still tokenize (byte by byte).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@lru_cache(maxsize=1)
def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, others are shifted."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, shift = [], 0
    table = {}
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    codes = [table[b] for b in range(256)]
    return codes


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE: repeatedly merge the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        pairs = [
            (ranks.get((a, b), 1 << 30), i)
            for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))
        ]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def write_clip_tokenizer(folder: str | Path, words: Iterable[str], model_max_length: int = 16) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json so `CLIPTokenizer.from_pretrained(folder)` loads.

    Merges are added greedily, each with a lower priority than all before it; a word that is
    already one token never meets a pair the later merges introduce, so every word stays whole.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = _byte_symbols()
    vocab_list = table + [s + "</w>" for s in table]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        chars = [table[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        while len(toks := _bpe(chars, ranks)) > 1:
            pair = (toks[0], toks[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab_list.append(pair[0] + pair[1])
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS})
    )
    return folder


def write_t5_tokenizer(
    folder: str | Path, sentences: Iterable[str], vocab_size: int = 400, model_max_length: int = 32
) -> Path:
    """Train a SentencePiece unigram model on `sentences` (offline, one thread, deterministic) and
    write it as a T5 tokenizer (T5's ids: <pad> 0, </s> 1, <unk> 2; no extra ids) that
    `T5Tokenizer.from_pretrained(folder)` loads; the trained spiece.model is kept beside it."""
    import io

    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",  # no normaliser: the tokenizers Unigram sees the same text
        hard_vocab_limit=False,  # a small corpus may not fill vocab_size
        num_threads=1,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length).save_pretrained(folder)
    return folder
