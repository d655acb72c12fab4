"""Engines behind one contract: ``contract`` (the interface and its value types), ``step_audio``
(the real Step-Audio-EditX engine), ``prompt_bundle`` (prompt work per clip, cache-first),
``select`` (which engine to run). The preview engine lives in ``preview/``."""
