"""Test-only: processes started with this folder on PYTHONPATH run megatron-core on the CPU.

Python imports `sitecustomize` at start-up, before any test or product code. It installs the
shim (`tests/megatron/cpu_shim.py`) right after `torch` is first imported, so it is in place
before megatron-core reads anything it patches, and processes that never import torch (Ray's
own daemons) pay nothing. Tests put this folder on PYTHONPATH for the processes they start
(torchrun children, Ray workers); product code never sees it.
"""

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

SHIM_DIR = str(Path(__file__).resolve().parent.parent)


class _InstallAfterTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            sys.path.insert(0, SHIM_DIR)
            import cpu_shim

            cpu_shim.install()

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _InstallAfterTorch())
# Tells the driver's hardware check (actors/preflight.py) that megatron-core may run without
# GPUs here; the driver's children (Ray workers, torchrun ranks) inherit it with PYTHONPATH.
os.environ.setdefault("SLUICE_MEGATRON_CPU_SHIM", "1")
