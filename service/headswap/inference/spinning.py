"""Choosing, by measurement, whether a lone request's inference runs on spinning threads.

ONNX Runtime's intra-op threads can spin (wait hot) between ops. For a request that runs alone
on a quiet machine that saves a thread wake-up per parallel op (Triton-like servers with spinning
on were 14% faster for one client); when other processes compete for the cores, spinning threads
take turns away from the working ones and the same run became 3-5x slower on the shared
development machine. Which one wins depends on the machine at the time, so it is measured: the
faster session so far serves, and the other is tried again now and then.
"""

from __future__ import annotations

PROBE_EVERY = 32  # one lone run in this many tries the slower-so-far session again...
CLEAR_LOSS = 1.5  # ...or one in PROBE_EVERY * RARE_FACTOR when it costs this many times the faster one
RARE_FACTOR = 8
SMOOTHING = 0.2  # weight of the newest run in the moving average of each session's cost


class FasterOfTwo:
    """Moving-average cost (ns per image) of two options; `pick` mostly returns the cheaper one.

    Used from one batcher thread; a race with the warm-up only blurs one sample.
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
        self.cost[option] = ns_per_image if cost is None else cost + SMOOTHING * (ns_per_image - cost)
