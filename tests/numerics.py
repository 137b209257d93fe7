"""Numeric comparisons stated relative to the magnitude they compare, so they hold on any x86-64 CPU's kernels."""

from __future__ import annotations

import torch

PARITY = 1e-4
"""The reference-parity goal: within 1e-4 of the compared values' scale."""


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = PARITY, msg: str | None = None) -> None:
    """``actual`` equals ``expected`` to ``rel`` of the largest magnitude in ``expected`` (elementwise, plus ``rel`` relative)."""
    expected = torch.as_tensor(expected)
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(torch.as_tensor(actual), expected, atol=rel * max(scale, 1e-12), rtol=rel, msg=msg)
