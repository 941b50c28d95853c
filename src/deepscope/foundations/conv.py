"""2-D convolution by hand: explicit loops, then unfold + matmul (im2col), both equal to `F.conv2d`.

Like `F.conv2d` this is really cross-correlation (the kernel is not flipped). Shapes follow torch:
x (N, C_in, H, W), weight (C_out, C_in, kH, kW), bias (C_out,) or None.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """How many kernel positions fit along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def conv2d_loops(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 stride: int = 1, padding: int = 0) -> torch.Tensor:
    """Loop over batch, output channel and output position; each output is one patch-times-kernel sum."""
    n, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    oh, ow = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    xp = F.pad(x, (padding, padding, padding, padding))        # (N, C_in, H + 2p, W + 2p), zeros around
    out = torch.zeros(n, c_out, oh, ow, dtype=x.dtype)
    for b in range(n):
        for o in range(c_out):
            for i in range(oh):
                for j in range(ow):
                    r, c = i * stride, j * stride
                    patch = xp[b, :, r:r + kh, c:c + kw]       # (C_in, kH, kW)
                    out[b, o, i, j] = (patch * weight[o]).sum()
            if bias is not None:
                out[b, o] += bias[o]
    return out


def conv2d_unfold(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  stride: int = 1, padding: int = 0) -> torch.Tensor:
    """im2col: copy every patch into a column, then the whole convolution is one matrix product."""
    n, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    oh, ow = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)   # (N, C_in*kH*kW, oH*oW)
    kernels = weight.reshape(c_out, -1)                              # (C_out, C_in*kH*kW)
    out = kernels @ cols                                             # (N, C_out, oH*oW), broadcast over N
    if bias is not None:
        out = out + bias[:, None]                                    # (C_out, 1) broadcast over positions
    return out.reshape(n, c_out, oh, ow)                             # (N, C_out, oH, oW)
