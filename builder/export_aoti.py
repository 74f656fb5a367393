"""torch.export + AOTInductor: compile a program into a .pt2 package without weights, and load
it back with the engine's own tensors as its constants."""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import signal
from pathlib import Path

import torch
from torch import nn

# Weights stay out of the package: the loader hands the program the tensors it read from the
# engine's safetensors (user-managed, so the forward and draft programs share one copy). Every
# tensor keeps its module name, small ones too: inlined or renamed, a tensor (the int4 group
# size, say) would become a constant that no engine file holds.
# emulate_precision_casts: round where eager rounds (a bf16 tensor cast up to float32, as CPU
# attention does, keeps its bf16 rounding), so a compiled program computes what its model does.
INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True,
                    "emulate_precision_casts": True}


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return tensors


def _spec(path: Path) -> Path:
    """Beside each package: the dtype and shape of every tensor it was compiled against."""
    return path.with_suffix(".constants.json")


def _attention_for_export(args: tuple):
    """On CUDA, trace attention in its math form (matmuls + softmax, which the compiler fuses):
    the fused kernels' selection reasons about strides that export must then prove. This, with
    the forward program's static span (programs.static_span), is what export passed with on an
    H100 (torch 2.11); the math form alone did not remove the dynamic span's guards."""
    if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def compile_aoti(module: nn.Module, args: tuple, dynamic_shapes, path: Path) -> Path:
    """Export `module` at `args` (with `dynamic_shapes`) and write the AOTInductor package,
    plus the dtype/shape of every tensor of `module` (the package holds no weights, and binds
    whatever it is given: a tensor of another dtype or shape would be read as garbage)."""
    import torch._inductor

    with torch.no_grad(), _attention_for_export(args):
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
        out = torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                      inductor_configs=INDUCTOR_CONFIGS)
    spec = {n: [str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in _tensors(module).items()}
    _spec(path).write_text(json.dumps(spec))
    return Path(out)


def load_aoti(path: Path, module: nn.Module):
    """Load a package and bind the constants it needs to `module`'s parameters and buffers
    (the same module structure it was exported from, holding the engine's weights), after
    checking each against the dtype and shape the package was compiled for."""
    import torch._inductor

    program = torch._inductor.aoti_load_package(str(path))
    tensors = _tensors(module)
    needed = program.get_constant_fqns()
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise ValueError(f"program {path.name} needs tensors the engine does not hold ({missing[:3]}): "
                         "the engine was built by another redrafter version, rebuild it")
    spec = json.loads(_spec(path).read_text()) if _spec(path).is_file() else {}
    for n in needed:
        got = [str(tensors[n].dtype).removeprefix("torch."), list(tensors[n].shape)]
        if n in spec and spec[n] != got:
            raise ValueError(f"program {path.name} was compiled for {n} as {spec[n][0]} {spec[n][1]} but the "
                             f"engine's model holds {got[0]} {got[1]}: the engine was built by another "
                             "redrafter version, rebuild it")
    program.load_constants({n: tensors[n] for n in needed}, check_full_update=True, user_managed=True)
    return program


def verify_forward(path: Path, model, max_batch: int, capacity: int, span: int | None, tokens: int = 8) -> None:
    """Run the compiled forward (compiled for key span `span`: programs.static_span) against the
    eager model on a random prompt; a build whose program disagrees (or returns non-finite
    values) fails here instead of shipping."""
    from .programs import BaseForward
    from redrafter.runtime.model import attention_mask, causal_mask

    program = load_aoti(path, BaseForward(model))
    dev = model.embed.weight.device
    ids = torch.randint(0, model.cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    positions = torch.arange(tokens, device=dev)[None]
    slots, starts = torch.zeros(1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
    mask = attention_mask(starts, causal_mask(1, tokens, dev), span or tokens)
    caches = [model.new_cache(max_batch, capacity) for _ in range(2)]
    with torch.inference_mode():
        ref = model.forward_masked(ids, positions, caches[0], slots, starts, mask).float()
        got = program(ids, positions, caches[1].k, caches[1].v, slots, starts, mask.contiguous()).float()
    tol = 1e-3 if model.embed.weight.dtype == torch.float32 else 5e-2
    err = (got - ref).abs().max().item()
    if not torch.isfinite(got).all() or err > tol * max(ref.abs().max().item(), 1.0):
        raise ValueError(f"the compiled forward program disagrees with eager PyTorch (max abs difference {err:.3g}, "
                         f"finite: {bool(torch.isfinite(got).all())}) for dtype {model.embed.weight.dtype}: "
                         "AOTInductor miscompiles this configuration here; build with --backend eager or "
                         "--dtype float32")


def verify_engine_forward(engine_dir: Path, cfg, quantize: str, dtype: torch.dtype, device: str, path: Path,
                          max_batch: int, capacity: int, span: int | None, exact_attention: bool = False) -> None:
    """verify_forward against the model as the runtime will load it from the engine's files, in
    a fresh process: some torch builds' AOTInductor loaders crash the process outright (torch
    2.11.0+cu130 on an H100 VM segfaulted loading any CUDA package, even one nn.Linear), and a
    crash must end the build with a clear error, not take the builder down with it."""
    run_isolated(_verify_from_files, engine_dir, cfg, quantize, dtype, device, path, max_batch, capacity, span,
                 exact_attention,
                 crash=f"loading the compiled program {path.name} crashed the process ({{how}}): AOTInductor in "
                       f"this torch build ({torch.__version__}) could not load it on {device} (torch 2.11.0+cu130 "
                       "on an H100 segfaulted so on every CUDA package); build with --backend eager")


def _verify_from_files(engine_dir: Path, cfg, quantize: str, dtype: torch.dtype, device: str, path: Path,
                       max_batch: int, capacity: int, span: int | None, exact_attention: bool) -> None:
    from .engine import load_base_weights

    verify_forward(path, load_base_weights(engine_dir, cfg, quantize, dtype, torch.device(device), exact_attention),
                   max_batch, capacity, span)


def run_isolated(fn, *args, crash: str) -> None:
    """fn(*args) in a spawned process. An exception there (its message), or a death without one
    (message `crash`, {how} standing for the signal or exit code), is raised here as a
    ValueError: the CLI's clear error, as for other things this machine lacks (TensorRTUnavailable)."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, fn, args), daemon=True)  # ends with the build
    child.start()
    send.close()
    try:
        error = receive.recv()
    except EOFError:  # no message: the child died
        error = None
    child.join()
    if error:
        raise ValueError(error)
    if child.exitcode:
        how = signal.Signals(-child.exitcode).name if child.exitcode < 0 else f"exit code {child.exitcode}"
        raise ValueError(crash.format(how=how))


def _child(send, fn, args: tuple) -> None:
    try:
        fn(*args)
    except Exception as e:  # the message crosses the process boundary; the parent raises it
        send.send(f"{e}")
    else:
        send.send(None)
