"""llm.prompts: templates, instruction strings and prompt-id layouts, byte-exact to the reference.

Expected values come from tests/fixtures/prompts.json (extracted from the upstream code), and the
expected id layouts are assembled here from that file's templates with a tokenizer built in the
test, one encode call per piece, so nothing expected is produced by the code under test.
"""

import json

import numpy as np
import pytest
import soundfile as sf
from conftest import FIXTURES

from core import audio_tokens
from core.audio_tokens import audio_string
from core.errors import InputError
from llm import prompts

SPEC = json.loads((FIXTURES / "prompts.json").read_text(encoding="utf-8"))
IDS = SPEC["special_ids"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from testkit.tiny_models import build_tiny_tokenizer

    return build_tiny_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def encode(tokenizer):
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


class RecordingEncode:
    """An encode that remembers every string it was asked to encode."""

    def __init__(self, encode):
        self.encode, self.calls = encode, []

    def __call__(self, text):
        self.calls.append(text)
        return self.encode(text)


def test_constants_match_the_reference():
    assert prompts.CLONE_SYSTEM_TEMPLATE == SPEC["AUDIO_EDIT_CLONE_SYSTEM_PROMPT_TPL"]
    assert prompts.EDIT_SYSTEM_PROMPT == SPEC["AUDIO_EDIT_SYSTEM_PROMPT"]
    assert (prompts.BOS_ID, prompts.END_OF_TURN_ID, prompts.BEGIN_OF_TURN_ID) == (
        IDS["bos"], IDS["end_of_turn"], IDS["begin_of_turn"])
    assert audio_tokens.AUDIO_ID_OFFSET == SPEC["generation"]["vocoder_offset"]
    assert set(prompts.EDIT_PROMPT_TYPES) == set(SPEC["supported_edit_types"]) - {"clone"}


@pytest.mark.parametrize("case", SPEC["edit_instruction_examples"],
                         ids=lambda c: f"{c['edit_type']}-{c['edit_info']}")
def test_every_instruction_example_is_byte_exact(case):
    got = prompts.edit_instruction(case["edit_type"], case["edit_info"], case["audio_text"], case["text"])
    assert got == case["instruct_prefix"]


def test_instruction_examples_cover_every_option():
    assert len(SPEC["edit_instruction_examples"]) == 55
    seen = {(c["edit_type"], c["edit_info"]) for c in SPEC["edit_instruction_examples"]}
    for edit_type, options in SPEC["supported_edit_types"].items():
        for option in options or [None]:
            assert edit_type == "clone" or (edit_type, option) in seen


def test_unsupported_edit_type_is_an_input_error_listing_choices():
    with pytest.raises(InputError, match="unsupported edit type 'clone'.*emotion.*paralinguistic"):
        prompts.edit_instruction("clone", None, "x")


def test_audio_text_none_becomes_empty():
    assert prompts.edit_instruction("emotion", "sad", None).endswith("is: \n")


def test_audio_token_string_format():
    fmt = SPEC["audio_token_string"]
    mixed = [5, 1023, 1024, 1030, 5119]
    assert audio_string(mixed) == fmt["separator"].join(fmt["format"].format(N=n) for n in mixed)


def _expected_clone(encode, speaker, prompt_text, audio_str, target):
    system = SPEC["AUDIO_EDIT_CLONE_SYSTEM_PROMPT_TPL"].format(speaker=speaker, prompt_text=prompt_text,
                                                               prompt_wav_tokens=audio_str)
    role = SPEC["role_strings"]
    newline = encode("\n")
    return ([IDS["bos"], IDS["begin_of_turn"]] + encode(role["system"] + system) + [IDS["end_of_turn"]]
            + [IDS["begin_of_turn"]] + encode(role["human"]) + encode("\n" + target)[len(newline):]
            + [IDS["end_of_turn"], IDS["begin_of_turn"]] + encode(role["assistant"]))


@pytest.mark.parametrize("target", ["Hello world.", "  Hello world.\t", "你好，世界。", "[Cantonese]ok"])
def test_clone_prompt_ids_layout(encode, target):
    audio_str = audio_string([1, 2, 1024, 2000, 5119, 7, 8, 1025, 1026, 1027])
    recorder = RecordingEncode(encode)
    ids = prompts.clone_prompt_ids(recorder, "clone_0123456789abcdef", "The prompt.", audio_str, target)
    assert ids == _expected_clone(encode, "clone_0123456789abcdef", "The prompt.", audio_str, target)
    assert ids.count(IDS["bos"]) == 1 and ids[:2] == [IDS["bos"], IDS["begin_of_turn"]]
    # Separate encode calls; the target is encoded behind a newline and never stripped.
    assert "\n" + target in recorder.calls and "human\n" in recorder.calls and "assistant\n" in recorder.calls
    assert all(not call.startswith("human\n") or call == "human\n" for call in recorder.calls)
    # The audio tokens of the prompt sit inside the system turn as <audio_N> ids.
    assert [i - 65536 for i in ids if i >= 65536] == [1, 2, 1024, 2000, 5119, 7, 8, 1025, 1026, 1027]


@pytest.mark.parametrize("case", SPEC["edit_instruction_examples"][::6],
                         ids=lambda c: f"{c['edit_type']}-{c['edit_info']}")
def test_edit_prompt_ids_layout(encode, case):
    audio_str = audio_string([3, 4, 1100, 1200, 1300])
    instruction = prompts.edit_instruction(case["edit_type"], case["edit_info"], case["audio_text"], case["text"])
    recorder = RecordingEncode(encode)
    ids = prompts.edit_prompt_ids(recorder, instruction, "  " + audio_str + "\n")
    role = SPEC["role_strings"]
    expected = ([IDS["bos"], IDS["begin_of_turn"]] + encode(role["system"] + SPEC["AUDIO_EDIT_SYSTEM_PROMPT"])
                + [IDS["end_of_turn"], IDS["begin_of_turn"]] + encode(role["human"])
                + encode(case["instruct_prefix"] + "\n" + audio_str + "\n")
                + [IDS["end_of_turn"], IDS["begin_of_turn"]] + encode(role["assistant"]))
    assert ids == expected
    # Instruction and audio are one call, separated by a blank line (the prefix ends with "\n").
    assert case["instruct_prefix"] + "\n" + audio_str + "\n" in recorder.calls


def test_text_tokenizer_encode_never_adds_bos(tokenizer, tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from llm.text_tokenizer import load_text_tokenizer

    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert with_bos.encode("human\n")[0] == 1   # this tokenizer would add BOS by default
    with_bos.save_pretrained(tmp_path)
    assert load_text_tokenizer(tmp_path).encode("human\n") == with_bos.encode("human\n")[1:]


def test_clone_speaker_id_examples():
    example = SPEC["clone_speaker_id"]["example_fixture_wav"]
    samples, _ = sf.read(FIXTURES / "prompt_22k.wav", dtype="float32")
    assert prompts.clone_speaker_id(example["prompt_text"], samples) == example["speaker"]
    short = SPEC["clone_speaker_id"]["example_short"]
    wav = (np.arange(10, dtype=np.float32) / 10).reshape(1, 10)
    assert prompts.clone_speaker_id(short["prompt_text"], wav) == short["speaker"]
