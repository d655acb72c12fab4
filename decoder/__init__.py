"""Step-Audio-EditX's audio decoder (CosyVoice-300M-25Hz): mixed audio tokens -> 24 kHz speech.

Modules, one job each:
    config.py     read ``cosyvoice.yaml`` as data (no code execution) into ``DecoderConfig``
    encoder.py    upsampling conformer encoder (25 Hz tokens -> 50 Hz features)
    estimator.py  DiT velocity estimator of the flow-matching decoder
    flow.py       token embedding, speaker projection, Euler CFM solver with guidance
    vocoder.py    HiFT vocoder (mel -> waveform) with its F0 predictor and weight-norm key styles
    source.py     HiFT's harmonic-plus-noise source (and its random draws)
    frontend.py   prompt features: 24 kHz mel and CAM++ speaker embedding
    model.py      ``AudioDecoder``: loads the folder strictly, ``prompt_features``, ``token2wav``
    streaming.py  chunked decoding for streams: ``StreamingDecoder`` (cached per-voice prompt state),
                  ``DecodeSession`` (push ids, drain audio chunks), ``VocoderStream``

Checkpoints are read and strictly loaded by ``core/checkpoint.py``; the token layout is
``core/audio_tokens.py``. Use ``from decoder.model import AudioDecoder``.
"""
