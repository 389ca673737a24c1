"""Test setup shared by every test file.

Triton reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, i.e. when a kernels/ module is imported, so it
must be set before any test imports them. On a machine without CUDA the kernels can only run in the interpreter.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Make `import radjepa`, `import kernels`, ... work from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
