"""Process-wide tuning for a node process. Only a process's owner applies it (the ``run``
command, the benchmark's node children); the library layers never touch global state.
"""

from __future__ import annotations

import gc

# The collector's thresholds once the heap has settled: a generation-0 pass every 10K
# allocations instead of every 700, and older generations a little less often.
GC_THRESHOLDS = (10_000, 20, 20)


def settle_heap() -> None:
    """Take everything alive after start-up out of the collector's sight.

    A node's heap is mostly objects that live as long as the process (modules, the
    libp2p host: an idle host alone holds ~86 MiB). Every full collection walked them
    all again, and a bootstrap allocates enough to trigger many: freezing them after
    start-up took a 10K-entry libp2p bootstrap from 0.63 to 0.51 s and a 100K one from
    6.2 to 5.6 s on this 2-core machine (``scripts/bench transport``). Garbage made
    later is still collected as usual.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
