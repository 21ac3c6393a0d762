"""The CPU allocator setting is applied (in a child process, so the test process is untouched)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc setting, Linux only")
def test_keep_freed_memory_in_heap_applies_on_linux():
    code = (
        "from models.runtime import keep_freed_memory_in_heap;"
        "import torch;"
        "assert keep_freed_memory_in_heap();"
        # a large tensor still allocates and computes correctly afterwards
        "x = torch.ones(64, 2**20); assert float(x.sum()) == 64 * 2**20"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
