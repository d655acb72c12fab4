"""bench/hf_step1.py: the ``transformers.generate`` baseline that bench/llm_bench.py times.

Covers: driven by the pinned transformers' ``generate`` (greedy, its own cache between steps), the
wrapper around our Step1 modules reproduces the reference's golden greedy ids for both golden
prompts. A transformers release that renames how the cache reaches ``forward`` (5.x passes
``cache``, 4.x ``past_key_values``) makes each step see only its own token and fails here, instead
of silently timing a wrong decode.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.hf_step1 import HFStep1
from llm.checkpoint import load_step1

FIXTURES = Path(__file__).parent / "fixtures" / "llm"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", ["a", "b"])
def test_generate_baseline_gives_the_golden_greedy_ids(name):
    golden = load_file(str(FIXTURES / "golden_step1.safetensors"))
    hf = HFStep1(load_step1(FIXTURES, "cpu", torch.float32)).eval()
    prompt, want = golden[f"prompt_{name}"], golden[f"greedy_{name}"].tolist()
    with torch.inference_mode():
        out = hf.generate(prompt[None], max_new_tokens=len(want), do_sample=False, pad_token_id=0)
    assert out[0, len(prompt):].tolist() == want
