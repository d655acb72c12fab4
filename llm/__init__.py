"""The Step-Audio-EditX language model: prompts, sampling, the Step1 network and our decode loop.

Owns: everything between "a prompt bundle and some text" and "a list of LLM audio ids":
the byte-exact prompt layout (``prompts``), the sampling rules and output filtering
(``sampling``), the backend contract (``backend``), Step1 in plain torch (``step1``) and its
strict safetensors loader (``checkpoint``), the tokenizer read as data (``text_tokenizer``), the
continuous-batching decode loop (``native``), and splitting long text / joining the audio pieces
(``longform``).
Does not own: audio tokenisation (``tokenizer/``), the audio-token layout (``core.audio_tokens``),
waveform synthesis (``decoder/``), request orchestration and timing (``tts_engine/step_audio.py``).
"""
