"""The linear layer of the model: oneDNN's matmul on the CPU, torch's everywhere else.

On this project's CPUs torch's default float32 matmul (MKL) runs at about 40% of what the
same cores do through oneDNN, which uses every vector unit the CPU has (measured: a 2048^3
matmul at 157 vs 367 GFLOP/s, and the 48-row decode matmuls at about 100 vs 200). oneDNN is
slower only for one or two rows, where the step is bound by reading the weights anyway, so
those keep torch's path. Results agree with torch's to float32 rounding (sums reordered).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_MIN_ROWS = 3


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in]^T + bias, through oneDNN for float32 CPU batches."""
    if (
        _ONEDNN
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.dim() == 2
        and x.shape[0] >= ONEDNN_MIN_ROWS
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint names) with the matmul above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
