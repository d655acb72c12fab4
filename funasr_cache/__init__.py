"""The persistent, content-addressed, multi-process prompt cache.

``store.PromptCache`` is the public face (the contract is in its docstring and in
docs/cache.md); ``files`` owns entry bytes on disk, ``index`` the in-process LRU index and
``stats`` the counters merged across processes. The runtime data folder is ``cache/`` at the
repository root (``--cache-dir``), not this package.
"""
