"""What users make (voices now; productions next), kept in one database: SQLite by default,
PostgreSQL when the studio spans several hosts.

Modules: ``db`` (engine, transactions, migrations at start, backup), ``schema`` (tables),
``blobs`` (content-addressed bytes), ``voices`` (the voice repository), ``migrations`` (Alembic).
Imports flow into this package from ``web`` only; the engine never imports it (it receives a
prompt source, ``funasr_cache.PromptSource``, from ``web``).
"""
