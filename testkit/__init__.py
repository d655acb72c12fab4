"""Support shared by the tests and the benchmarks: tiny random-weight models of the real layouts
and a real studio server on 127.0.0.1. Never imported by the app."""
