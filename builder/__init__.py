"""Engine builder: `redrafter build` -> an engine directory (weights, tokenizer, compiled programs).

The option names live here, free of heavy imports, so the CLI's --help stays fast.
"""
BACKENDS = ("eager", "aoti", "onnx", "tensorrt")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
QUANTIZE = ("none", "int8", "int4")
# Concurrent requests an engine serves by default: a served engine batches up to this many. Each slot's
# cache is allocated when a decoder opens (SmolLM2 fp32 at 2048 tokens: about 95 MB a slot); the
# programs' batch dimension is dynamic above 1, so a larger maximum costs no compile time.
MAX_BATCH_SIZE = 8
