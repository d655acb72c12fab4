"""Benchmark baseline only: Step1 driven by ``transformers.generate``, the way the reference runs it.

Owns: ``HFStep1``, a ``PreTrainedModel`` + ``GenerationMixin`` wrapper around *our* Step1 modules
(same weights, no copy) whose forward does what the reference ``modeling_step1.py`` fallback does
each step: a transformers ``DynamicCache`` (concatenating keys/values), the sqrt-ALiBi bias rebuilt
from the key length (``bias[:, :, -q_len:, :]``, ``attention_mask`` ignored), SDPA, and logits for
every position. It lets ``bench/llm_bench.py`` time ``generate`` against our own loop on a model of
exactly the same dimensions, without running any model-folder code and without a Llama stand-in.
Does not own: anything the studio runs. Not for production: it inherits the reference's padding bug.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from llm.step1 import Step1ForCausalLM


class HFStep1Config(PretrainedConfig):
    model_type = "step1_bench"


class HFStep1(PreTrainedModel, GenerationMixin):
    config_class = HFStep1Config
    main_input_name = "input_ids"

    def __init__(self, inner: Step1ForCausalLM) -> None:
        c = inner.config
        super().__init__(HFStep1Config(vocab_size=c.vocab_size, bos_token_id=c.bos_token_id,
                                       eos_token_id=list(c.eos_token_id), pad_token_id=c.pad_token_id,
                                       num_hidden_layers=c.num_hidden_layers, tie_word_embeddings=False))
        self.inner = inner
        self.slopes = torch.tensor(inner._slopes, dtype=torch.float32, device=inner.lm_head.weight.device)

    def get_input_embeddings(self):
        return self.inner.model.embed_tokens

    def _bias(self, q_len: int, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
        i = torch.arange(kv_len, device=self.slopes.device)
        distance = (i[:, None] - i[None, :]).float()                                   # [K,K], full length
        bias = -self.slopes[:, None, None] * distance.clamp(min=0).sqrt()[None]
        bias = bias.masked_fill((distance < 0)[None], float("-inf"))
        return bias[None, :, -q_len:, :].to(dtype)

    def forward(self, input_ids: torch.Tensor, cache=None, use_cache: bool = True, **kwargs):
        # transformers 5 hands the cache to forward as ``cache`` (``past_key_values`` before); under the
        # old name it would land in **kwargs and every step would attend to its own token only.
        m, c = self.inner.model, self.inner.config
        if cache is None:
            cache = DynamicCache()
        x = m.embed_tokens(input_ids)
        b, s, _ = x.shape
        h, g, d = c.num_attention_heads, c.num_attention_groups, c.head_dim
        bias = None
        for idx, layer in enumerate(m.layers):
            attn = layer.self_attn
            y = layer.input_layernorm(x)
            q = attn.q_proj(y).view(b, s, h, d).transpose(1, 2)
            k = attn.k_proj(y).view(b, s, g, d).transpose(1, 2)
            v = attn.v_proj(y).view(b, s, g, d).transpose(1, 2)
            k, v = cache.update(k, v, idx)
            if bias is None:
                bias = self._bias(s, k.shape[2], x.dtype)
            k, v = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, s, h * d))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.inner.lm_head(m.norm(x))
        return CausalLMOutputWithPast(logits=logits, cache=cache)
