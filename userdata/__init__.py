"""What users make (voices now; productions next), kept in one database: SQLite by default,
PostgreSQL when the studio spans several hosts.

Modules: ``db`` (engine, transactions, migrations at start, backup), ``schema`` (tables),
``blobs`` (content-addressed bytes), ``voices`` (the voice repository), ``voice_audio`` (what of a
clip is kept), ``legacy`` (importing the old voice folders), ``migrations`` (Alembic), ``__main__``
(``python -m userdata backup|restore|upgrade|check``).

For a new table (productions): add it to ``schema.py`` (and to ``schema.BLOB_REFERENCES`` if it
references ``blobs``), add a revision in ``migrations/versions/`` whose ``down_revision`` is
``"0001_voices"``, write rows inside ``Database.write()`` and read them inside ``Database.read()``.
Imports flow into this package from ``web`` only; the engine never imports it (it receives a
prompt source, ``funasr_cache.PromptSource``, from ``web``).
"""
