"""Choosing between ways to run a batch by measuring them: the fastest so far serves, and the
others are tried again now and then, because which one wins depends on the machine and the traffic.

1. Whether a lone request runs on spinning threads (`ModelRuntime.infer_lone`). ONNX Runtime's
   intra-op threads can spin (wait hot) between ops. For a request that runs alone on a quiet
   machine that saves a thread wake-up per parallel op (Triton-like servers with spinning on were
   14% faster for one client); when other processes compete for the cores, spinning threads take
   turns away from the working ones and the same run became 3-5x slower on the shared development
   machine.
2. Whether a bf16 or int8 tier runs the tier and re-checks near ties in fp32, or runs fp32
   straight (`OpenVinoRuntime.infer`). On clear photos almost nothing is re-checked and the tier
   wins; when about half the images are near ties, the tier plus their re-check costs more than
   fp32 alone.
3. How many queued images a lane takes at most (`Batcher`: --max-batch-size, then 4, 2, 1).
   A bigger batch is not always cheaper per image: on the 2-core development machine (EfficientNet-
   Lite0, one thread a lane) an image cost 4.7-5.0 ms of raw ONNX Runtime in batches of 2 and 6.2
   ms in batches of 8, whose activations no longer fit the core's cache; at 16 REST clients,
   choosing by measurement served 1.07x the images/s of always taking up to 8. Many threads per
   lane or a wider model may favour bigger batches, which is why it is measured, not fixed.
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


class Fastest:
    """Moving-average cost (ns per image) of the option that serves; the latest probe of each other.
    `pick` mostly returns the cheapest one.

    A probe replaces the other option's cost instead of nudging it: that cost is old (it was last
    measured a probe period ago), and the traffic may have changed meanwhile. Averaged, after
    near-tie traffic had made an int8 tier look 1.6x dearer, clear photos ran at fp32 speed through
    a whole 8-second bench point at 16 clients (each probe, 256 runs apart, moved the average a
    fifth of the way); replaced, one probe switches back. A probe that stalled only delays the next
    switch; a lucky one is averaged away by the runs that follow.

    With more than two options the probes take turns among the others. `rare_factor`: how much less
    often a clear loser (CLEAR_LOSS) is probed. The lone-run spinning choice keeps RARE_FACTOR,
    because a contended spinning run cost 3-5x; a tier's probe costs at most its re-checks, so it
    probes every PROBE_EVERY runs to follow its traffic.

    Used from one thread at a time (a batcher thread or under a lock); a race with the warm-up only
    blurs one sample.
    """

    def __init__(self, options: int = 2, rare_factor: int = RARE_FACTOR) -> None:
        if options < 1:
            raise ValueError("a choice needs at least one option")
        self.cost: list[float | None] = [None] * options
        self.rare_factor = rare_factor
        self._runs = 0
        self._probed_at = [0] * options  # the run each option was last picked as a probe

    def best(self) -> int | None:
        """The cheapest option so far; None until every option is measured."""
        if any(cost is None for cost in self.cost):
            return None
        return min(range(len(self.cost)), key=lambda option: (self.cost[option], option))

    def pick(self) -> int:
        self._runs += 1
        best = self.best()
        if best is None:
            return self.cost.index(None)  # measure each once first
        others = [option for option in range(len(self.cost)) if option != best]
        if not others or self._runs % PROBE_EVERY:
            return best
        other = others[(self._runs // PROBE_EVERY) % len(others)]
        rare = self.cost[other] > CLEAR_LOSS * self.cost[best]
        if rare and self._runs - self._probed_at[other] < PROBE_EVERY * self.rare_factor:
            return best
        self._probed_at[other] = self._runs
        return other

    def record(self, option: int, ns_per_image: float) -> None:
        cost = self.cost[option]
        if cost is None or option != self.best():
            self.cost[option] = ns_per_image  # a first measurement, or a probe: the latest figure
        else:
            self.cost[option] = cost + SMOOTHING * (min(ns_per_image, OUTLIER_CAP * cost) - cost)
