"""The studio's web edge: the Gradio UI, the HTTP API, the voice store and the metrics.

Owns: translating user requests (browser events, HTTP calls) into engine calls, and engine
results and errors back into pages, audio files and JSON. Does not own: models, caching
mechanics or audio formats (see ``tts_engine/``, ``funasr_cache.store``, ``core.audio_io``).
"""
