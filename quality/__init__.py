"""Every take scored: content error, speaker similarity, signal checks, gates and word timestamps.

Owns: the scorers (``content``, ``speaker``, ``signal``), their combined report (``report``), the
per-request gates with best-of-N and retries (``gates``), word timings and caption lines
(``timestamps``), and the adapters that turn the real engine's own models (the tokenizer folder's
Paraformer, the decoder's CAM++) into a recogniser and a speaker embedder (``engine_models``).
Does not own: the models themselves, the engines, HTTP or the page (``web/``).
"""
