"""Workers hand freed image memory back to the operating system after each batch."""

from __future__ import annotations

import numpy as np
import psutil

from dicomnode.worker import release_freed_memory


def test_freed_heap_pages_go_back_to_the_system() -> None:
    process = psutil.Process()
    # 180 MB in heap-sized chunks (below glibc's mmap threshold), then freed except the
    # last, which pins the top of the heap so that glibc cannot shrink it by itself.
    chunks = [np.ones(60_000, dtype=np.uint8) for _ in range(3000)]
    last = chunks[-1]
    del chunks
    before = process.memory_info().rss
    release_freed_memory()
    after = process.memory_info().rss
    assert last.sum() == 60_000
    assert before - after > 100e6
