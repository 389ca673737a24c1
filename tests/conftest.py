"""Test setup shared by every test file.

Triton reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, i.e. when a kernels/ module is imported, so it
must be set before any test imports them. On a machine without CUDA the kernels can only run in the interpreter.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Make `import radjepa`, `import kernels`, ... work from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and probes: on busy shared cores extra threads only add overhead (4x slower measured).
    A test file opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def torch_path():
    """Every test starts and ends on the PyTorch ops (a test that turns the kernels on cannot leak them into the
    next one). A test file opts in with `pytestmark = pytest.mark.usefixtures("torch_path")`."""
    import radjepa
    radjepa.use_kernels(False)
    yield
    radjepa.use_kernels(False)
