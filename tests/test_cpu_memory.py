import sys

import pytest
import torch

from deepscope.cpu_memory import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_freed_tensor_memory_is_reused_without_page_faults():
    resource = pytest.importorskip("resource")
    assert keep_freed_memory() is True

    def faults_of(make):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        make()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    x = torch.ones(16 << 20)                          # 64 MiB: glibc would mmap it and unmap it on free
    del x
    pages = (64 << 20) // 4096
    assert faults_of(lambda: torch.ones(16 << 20)) < pages // 10  # the same memory, still mapped
