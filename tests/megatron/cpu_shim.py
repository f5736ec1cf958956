"""Test-only: let megatron-core 0.19.2 run on a machine with no GPU (gloo, CPU tensors).

megatron-core assumes CUDA in a handful of places that have nothing to do with the maths; this
module replaces exactly those with CPU equivalents so the product's Megatron backend can be
tested here. Product code never imports it: tests install it in their own processes (pytest,
torchrun children, Ray workers) through `tests/megatron/site/sitecustomize.py`, before
megatron-core is imported.

Patch points (see ../shared/device/README.md):
1. CUDA RNG state and the model-parallel RNG tracker -> the CPU generator;
2. torch.cuda.Stream / Event / stream() / current_stream / current_device / synchronize;
3. `Tensor.cuda()` and `device="cuda"` tensors created by the optimizer -> CPU;
4. `Tensor.type()` checks against `torch.cuda.*Tensor` names;
5. the hybrid (CPU-offload) optimizer's `param.is_cuda` split;
6. all-to-all split sizes handed to gloo as tensors -> lists.
"""

import contextlib
import functools

import torch
import torch.distributed as dist

_installed = False


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cpu_device(device):
    if device is None:
        return device
    if isinstance(device, int) or str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


def _patch_factory(name):
    original = getattr(torch, name)

    @functools.wraps(original)
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return original(*args, **kwargs)

    setattr(torch, name, factory)


def install() -> None:
    global _installed
    if _installed or torch.cuda.is_available():
        return
    _installed = True
    cuda = torch.cuda
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.current_device = lambda: "cpu"
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.manual_seed_all = lambda seed: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.empty_cache = lambda: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    for name in ("empty", "zeros", "ones", "full", "tensor", "arange", "empty_like", "zeros_like"):
        _patch_factory(name)
    _patch_rng()
    _patch_all_to_all()
    _patch_tensor_type()
    _patch_hybrid_optimizer_on_import()


def _patch_tensor_type() -> None:
    """The optimizers check `param.type()` against `torch.cuda.*Tensor` names."""
    original = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type


def _patch_hybrid_optimizer_on_import() -> None:
    """CPU Adam's HybridDeviceOptimizer offloads only `param.is_cuda` parameters; here every
    parameter lives on the CPU, so none would be offloaded and its copy path never run. The
    replacement treats each parameter as a device parameter (the same split, by numel), so
    the offload path (grad copy to the host, host step, copy back) is what runs."""
    import importlib

    def patch(module):
        module.HybridDeviceOptimizer._get_sub_optimizer_param_groups = _sub_optimizer_groups

    _after_import("megatron.core.optimizer.cpu_offloading.hybrid_optimizer", patch, importlib)


def _sub_optimizer_groups(self, offload_fraction):
    params = [p for group in self.param_groups for p in group["params"]]
    threshold = sum(p.numel() for p in params) * offload_fraction
    offloaded = 0
    cpu_groups, device_groups = [], []
    device_to_cpu, cpu_to_device, to_fp32 = {}, {}, {}
    for group in self.param_groups:
        device_group, cpu_group = dict(group, params=[]), dict(group, params=[])
        for param in group["params"]:
            original, copied = param, False
            if offloaded < threshold:
                param = param.detach().clone()
                offloaded += param.numel()
                copied = True
            if self.param_update_in_fp32 and param.dtype != torch.float32:
                param = param.detach().clone().float()
                to_fp32[original] = param
            if copied:
                device_to_cpu[original] = param
                cpu_to_device[param] = original
                cpu_group["params"].append(param)
            else:
                device_group["params"].append(param)
        if device_group["params"]:
            device_groups.append(device_group)
        if cpu_group["params"]:
            cpu_groups.append(cpu_group)
    return cpu_groups, device_groups, device_to_cpu, cpu_to_device, to_fp32


def _after_import(name, patch, importlib) -> None:
    """Run `patch(module)` when `name` is first imported (now, if it already is)."""
    import sys

    if name in sys.modules:
        patch(sys.modules[name])
        return

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


class _AnyIndex:
    """`torch.cuda.default_generators[i]` for any i: the CPU generator."""

    def __getitem__(self, index):
        return torch.default_generator

    def __len__(self):
        return 1


def _patch_rng() -> None:
    # megatron-core's RNG tracker saves and restores "the CUDA generator" through these; it
    # imports `_lazy_call` by name, so this must run before megatron-core is imported.
    torch.cuda._lazy_call = lambda callback, **kwargs: callback()
    torch.cuda.default_generators = _AnyIndex()
    torch.cuda.random.get_rng_state = lambda *a, **k: torch.get_rng_state()


def _patch_all_to_all() -> None:
    """gloo's all_to_all_single wants split sizes as lists; megatron-core passes tensors."""
    original_all_to_all = dist.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return original_all_to_all(output, input, output_split_sizes, input_split_sizes, **kw)

    dist.all_to_all_single = all_to_all_single
