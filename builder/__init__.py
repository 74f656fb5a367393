"""Engine builder: `redrafter build` -> an engine directory (weights, tokenizer, compiled programs).

The option names live here, free of heavy imports, so the CLI's --help stays fast.
"""
BACKENDS = ("eager", "aoti", "onnx", "tensorrt")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
QUANTIZE = ("none", "int8", "int4")
