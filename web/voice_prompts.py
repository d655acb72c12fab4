"""The prompt-cache entries that travel with a stored voice, as the web layer hands them over.

Owns: reading a clip's entries out of the engine's cache without computing or counting anything
(:func:`cached_prompts`, what a new voice stores with it), as ``funasr_cache.store.PromptEntry`` values,
the one type the engine's bundles and the voice store share.
Does not own: computing entries (the engine), storing them (``userdata.voices``), filling a cache
miss from the database (``funasr_cache.PromptCache`` with the voice store as its source).
"""

from __future__ import annotations

from typing import Mapping

from funasr_cache.store import PromptEntry
from tts_engine.contract import Engine


def cached_prompts(engine: Engine, digest: str, namespaces: Mapping[str, str] | None = None) -> tuple[PromptEntry, ...]:
    """The entries the engine's cache holds for the clip ``digest`` (under ``namespaces``, default
    the engine's own); kinds not cached are left out. Counts no hit or miss."""
    wanted = dict(engine.prompt_namespaces() if namespaces is None else namespaces)
    found = []
    with engine.cache.uncounted():
        for kind, namespace in sorted(wanted.items()):
            entry = engine.cache.get(kind, namespace, digest)
            if entry is not None:
                found.append(PromptEntry(kind, namespace, digest, dict(entry.payload), dict(entry.arrays),
                                          float(entry.cost_s)))
    return tuple(found)

