"""The Step-Audio-EditX language model: prompts, sampling, batching, loading, long text.

Owns: everything between "a prompt bundle and some text" and "a list of LLM audio ids":
the byte-exact prompt layout (``prompts``), the sampling rules and output filtering
(``sampling``), padded batched generation (``generation``), the request batcher (``batching``),
loading the model folder (``loader``) and splitting long text / joining the audio pieces
(``longform``).
Does not own: audio tokenisation (``tokenizer/``), the audio-token layout (``core.audio_tokens``),
waveform synthesis (``decoder/``), request orchestration and timing (``engine/step_audio.py``).
"""
