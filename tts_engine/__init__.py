"""Engines behind one contract: ``contract`` (the interface and its value types), ``step_audio``
(the real Step-Audio-EditX engine), ``prompt_bundle`` (its prompt bundle per clip),
``prompt_fetch`` (the one cache-first fetch of per-clip prompt work, shared with the preview
engine), ``select`` (which engine to run). The preview engine lives in ``preview/``."""
