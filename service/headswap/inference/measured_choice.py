"""Choosing between two ways to run a batch by measuring both: the faster so far serves, and the
other is tried again now and then, because which one wins depends on the machine and the traffic.

1. Whether a lone request runs on spinning threads (`ModelRuntime.infer_lone`). ONNX Runtime's
   intra-op threads can spin (wait hot) between ops. For a request that runs alone on a quiet
   machine that saves a thread wake-up per parallel op (Triton-like servers with spinning on were
   14% faster for one client); when other processes compete for the cores, spinning threads take
   turns away from the working ones and the same run became 3-5x slower on the shared development
   machine.
2. Whether a bf16 tier runs bf16 and re-checks near ties in fp32, or runs fp32 straight
   (`OpenVinoRuntime.infer`). On clear photos almost nothing is re-checked and bf16 wins; when
   about half the images are near ties, bf16 plus their re-check costs more than fp32 alone.
"""

from __future__ import annotations

PROBE_EVERY = 32  # one run in this many tries the slower-so-far option again...
CLEAR_LOSS = 1.5  # ...or one in PROBE_EVERY * RARE_FACTOR when it costs this many times the faster one
RARE_FACTOR = 8
SMOOTHING = 0.2  # weight of the newest run in the moving average of each option's cost
# A run counts as at most this many times its option's average: one run stalled by another process
# (seen here: 10x for one batch) would otherwise make the usual winner look slower, and a loser is
# re-measured only once every PROBE_EVERY * RARE_FACTOR runs. A real change still shows in a few runs.
OUTLIER_CAP = 2.0


class FasterOfTwo:
    """Moving-average cost (ns per image) of two options; `pick` mostly returns the cheaper one.

    Used from one thread at a time (a batcher thread, or under the runtime's lock); a race with the
    warm-up only blurs one sample.
    """

    def __init__(self) -> None:
        self.cost: list[float | None] = [None, None]
        self._runs = 0

    def pick(self) -> int:
        self._runs += 1
        for option, cost in enumerate(self.cost):
            if cost is None:
                return option  # measure each once first
        best = 0 if self.cost[0] <= self.cost[1] else 1
        every = PROBE_EVERY * (RARE_FACTOR if self.cost[1 - best] > CLEAR_LOSS * self.cost[best] else 1)
        return 1 - best if self._runs % every == 0 else best

    def record(self, option: int, ns_per_image: float) -> None:
        cost = self.cost[option]
        if cost is None:
            self.cost[option] = ns_per_image
        else:
            self.cost[option] = cost + SMOOTHING * (min(ns_per_image, OUTLIER_CAP * cost) - cost)
