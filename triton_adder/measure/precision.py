"""The TF32 switch for the float32 baselines: cuDNN convolutions default to TF32 on a GPU."""

from __future__ import annotations

import contextlib
import warnings

import torch


@contextlib.contextmanager
def tf32_mode(enabled: bool):
    """Allow or forbid TF32 in cuDNN convolutions and cuBLAS matmuls inside the block; restore after.

    Uses the per-operator `fp32_precision` flags where this torch has them (reading the legacy
    `allow_tf32` after someone set the new API can raise), else the legacy `allow_tf32` flags.
    cuDNN convolutions default to TF32 on: a "float32" baseline must turn it off explicitly.
    """
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        saved = (cudnn_conv.fp32_precision, matmul.fp32_precision)
        cudnn_conv.fp32_precision = matmul.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            cudnn_conv.fp32_precision, matmul.fp32_precision = saved
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved
