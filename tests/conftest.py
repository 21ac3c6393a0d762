"""Test-session setup.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``;
``tests/test_triton_depthwise.py``). The variable must be set before the first ``import triton``
(which ``models`` does): Triton decorates its own library functions when it is imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
