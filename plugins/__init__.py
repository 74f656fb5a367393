"""Custom ops for beam drafting and packed verification (torch.library namespace "redrafter").

ops: the four ops (beam_draft, pack_beams, packed_attention, kv_commit), their reference
implementations (the runtime's code) and runtime-facing helpers; importing it registers them.
kernels: the OpenAI Triton kernels the ops dispatch to on CUDA. onnx: the ONNX mapping
(custom domain "redrafter") for TensorRT plugins. gpu_check: kernel-vs-reference check and
timings on a GPU.
"""
