from __future__ import annotations

from transformers import CLIPTokenizer

from rlcm_exp.tokenizer import write_clip_tokenizer


def test_every_vocabulary_word_is_one_token(tmp_path) -> None:
    words = "a an on red green greenish blue background circle triangle tractor".split()
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, words, model_max_length=16))
    for w in words:
        assert tok.tokenize(w) == [w + "</w>"]
    ids = tok("a red circle on a blue background", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[0] == tok.bos_token_id and ids[8] == tok.eos_token_id
    # unknown words still tokenize, byte by byte
    assert len(tok.tokenize("zebra")) > 1
