"""llm.text_tokenizer: the LLM tokenizer is read from the folder's files as data.

Covers both file kinds the real folder may ship: ``tokenizer.json`` (the tiny real-layout tokenizer
from testkit) and a SentencePiece ``tokenizer.model`` (a small unigram model trained here with the
``sentencepiece`` library, whose own ``encode`` gives the expected ids); a ``tokenizer_config.json``
that names remote code is ignored (the code never runs); missing or corrupt files are ModelErrors.
"""

import json

import pytest

from core.errors import ModelError
from llm.text_tokenizer import load_text_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog near the river bank. Make the following audio more happy. "
        "Remove any noise from the given audio while preserving the voice content clearly. ") * 20


@pytest.fixture(scope="module")
def json_folder(tmp_path_factory):
    from testkit.tiny_models import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(folder)
    return folder


def test_tokenizer_json_keeps_the_real_id_layout(json_folder):
    tok = load_text_tokenizer(json_folder)
    assert tok.source.name == "tokenizer.json"
    assert tok.encode("<audio_0><audio_1023><audio_1024><audio_5119>") == [65536, 65536 + 1023, 66560, 70655]
    assert tok.token_id("<|EOT|>") == 3 and tok.token_id("<|BOT|>") == 4 and tok.eos_id == 2
    assert tok.encode("human\n")[0] != 1   # no BOS


def test_sentencepiece_model_is_converted_as_data(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT.replace(". ", ".\n"))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   model_type="unigram", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, user_defined_symbols=["<|EOT|>", "<|BOT|>"], minloglevel=2)
    folder = tmp_path / "llm"
    folder.mkdir()
    (tmp_path / "sp.model").rename(folder / "tokenizer.model")
    # A config that names remote code: it must be ignored, so the marker file is never written.
    (folder / "tokenization_evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = load_text_tokenizer(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    # "Zebra! 你好" needs byte fallback; the last keeps a user-defined piece whole after a newline.
    for text in ["The quick brown fox.", "audio more happy", "Zebra! 你好", "human\nThe fox<|EOT|>"]:
        assert tok.encode(text) == sp.encode(text), text
    assert tok.token_id("<|BOT|>") == sp.piece_to_id("<|BOT|>") == 4
    assert tok.eos_id == 2
    assert not (tmp_path / "ran").exists()


def test_missing_or_corrupt_tokenizer_is_a_model_error(json_folder, tmp_path):
    with pytest.raises(ModelError, match="neither tokenizer.json nor tokenizer.model"):
        load_text_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}}))
    with pytest.raises(ModelError, match=r"tokenizer\.json: the LLM tokenizer does not load"):
        load_text_tokenizer(tmp_path)
