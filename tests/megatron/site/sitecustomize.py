"""Test-only: processes started with this folder on PYTHONPATH run megatron-core on the CPU.

Python imports `sitecustomize` at start-up, before any test or product code, so the shim is
in place before megatron-core reads anything it patches. Tests put this folder on PYTHONPATH
for the processes they start (torchrun children, Ray workers); product code never sees it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cpu_shim

cpu_shim.install()
