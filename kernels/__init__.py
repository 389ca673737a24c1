"""
Triton kernels for RadJEPA's packed variable-length path (optional; radjepa.py runs without them).

    kernels/varlen_attention.py  varlen_attention(q, k, v, cu_seqlens, max_seqlen, sm_scale=None) + _ref
    kernels/gather.py            gather_rows(x, idx, pos=None), ln_gather_smooth_l1(z, h, idx, eps, beta) + _refs
    kernels/bench.py             GPU benchmark against torch varlen_attn / padded SDPA / truncation (one call)

Each kernel file is a self-contained tutorial with a pure-PyTorch reference of the same function. This package
file imports no kernel module: TRITON_INTERPRET is read when @triton.jit decorates, so whoever wants the CPU
interpreter must set it before importing kernels.varlen_attention / kernels.gather.
"""
import importlib.util
import os


def available():
    """(ok, reason): can the Triton kernels run here? True on CUDA with Triton, or in the CPU interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton; it ships with CUDA builds of torch)"
    import torch
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        return True, "TRITON_INTERPRET=1: Triton interpreter on CPU tensors (correct but very slow; for tests)"
    if torch.cuda.is_available():
        import triton
        return True, f"CUDA device {torch.cuda.get_device_name()} with triton {triton.__version__}"
    return False, "no CUDA device (and TRITON_INTERPRET is not set); use the PyTorch path"
