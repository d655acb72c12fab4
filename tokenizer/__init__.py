"""The Step-Audio dual-codebook audio tokenizer: vq02 (streaming Paraformer encoder + k-means) and
vq06 (S3 tokenizer, ONNX), interleaved 2:3 into LLM audio ids.

``step_audio.StepAudioTokenizer`` is the entry point; ``paraformer_stream`` runs the Paraformer
encoder chunk by chunk.
"""
