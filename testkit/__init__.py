"""Support shared by the tests and the benchmarks: tiny random-weight models of the real layouts,
a real studio server on 127.0.0.1, and a throwaway PostgreSQL server (``testkit.postgres``). Never
imported by the app."""
