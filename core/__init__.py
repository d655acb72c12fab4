"""Plumbing every stage shares: settings, audio I/O, timings, errors, devices, ONNX sessions and the
edit option lists. Nothing here knows about a model."""
