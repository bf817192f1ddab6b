"""Run megatron-core on a machine without CUDA: a testing and debugging aid, never used on a GPU.

megatron-core assumes CUDA in a few places that have nothing to do with the maths: it allocates small
bookkeeping tensors with ``device="cuda"`` (pipeline schedules, p2p shape exchange, grad-norm buffers),
asks ``torch.cuda`` for the current device and stream, keeps its RNG states as CUDA generator states, and
asserts that gradients are ``torch.cuda.FloatTensor`` before clipping. This module redirects exactly those
to the CPU so tensor/pipeline parallelism, Megatron's DDP and optimizer, and dist_checkpointing run on
gloo, with the same numbers the unsplit model gives.

It is installed by the Megatron engine only when CUDA is absent AND ``engine.megatron_cpu=true`` (the
test suite sets it); ``install()`` refuses when CUDA is present. Everything is in this one module.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def _cpu_device(value):
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    if isinstance(value, int) and not isinstance(value, bool):
        return "cpu"  # torch.cuda.current_device() style ordinals
    return value


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` (and ``.cuda()``) in torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device)):
            args = (args[0], _cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _CpuRNGTracker:
    """Megatron's named RNG-state tracker (model-parallel / data-parallel streams) on the CPU generator."""

    def __init__(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_, self.seeds_ = {}, set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)
        self.seeds_.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _clip_grads_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 without its CUDA tensor-type assertion."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    params = [parameters] if isinstance(parameters, torch.Tensor) else parameters
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for p in params:
            g = getattr(p, attr, None)
            if g is not None:
                g.detach().mul_(coeff)


def install(seed: int) -> None:
    """Patch torch.cuda queries, megatron's RNG tracker and grad clipping for CPU (idempotent)."""
    global _installed
    if torch.cuda.is_available():
        raise RuntimeError("the megatron CPU shim is for machines without CUDA; unset engine.megatron_cpu")
    if not _installed:
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.current_stream = lambda *a, **k: None
        import megatron.core.optimizer.clip_grads as clip_grads
        import megatron.core.optimizer.optimizer as optimizer
        import megatron.core.tensor_parallel.random as mrandom

        clip_grads.clip_grad_by_total_norm_fp32 = _clip_grads_by_total_norm
        optimizer.clip_grad_by_total_norm_fp32 = _clip_grads_by_total_norm
        mrandom._CUDA_RNG_STATE_TRACKER = _CpuRNGTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
        _installed = True
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    # The streams megatron's model_parallel_cuda_manual_seed would create (offsets as there).
    tracker.add("model-parallel-rng", seed + 2718 + parallel_state.get_tensor_model_parallel_rank())
    tracker.add("data-parallel-rng", seed + 10 * parallel_state.get_data_parallel_rank())
    tracker.add("expert-parallel-rng", seed + 2718 + 100 * parallel_state.get_expert_model_parallel_rank()
                + parallel_state.get_tensor_model_parallel_rank())


def on_cpu():
    """Context for megatron calls when the shim is in use (``device="cuda"`` allocations go to CPU)."""
    return _CudaToCpu() if _installed else contextlib.nullcontext()
