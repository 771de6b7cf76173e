"""The measured choice between two ways to run (lone-run spinning, a bf16 tier's re-check), and a
server in every spinning mode."""

from __future__ import annotations

import pytest

from conftest import BUILTIN_NAME
from headswap.inference.measured_choice import PROBE_EVERY, RARE_FACTOR, FasterOfTwo
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc


def run(chooser: FasterOfTwo, costs: tuple[float, float], runs: int) -> list[int]:
    picks = []
    for _ in range(runs):
        option = chooser.pick()
        chooser.record(option, costs[option])
        picks.append(option)
    return picks


def test_chooser_measures_both_then_keeps_the_faster_and_probes_the_other():
    chooser = FasterOfTwo()
    picks = run(chooser, (10.0, 8.0), 2 + 4 * PROBE_EVERY)
    assert picks[:2] == [0, 1]  # each measured once
    rest = picks[2:]
    assert rest.count(0) == 4 and rest.count(1) == len(rest) - 4  # the faster, with periodic probes


def test_chooser_follows_a_change_of_conditions():
    chooser = FasterOfTwo()
    run(chooser, (10.0, 8.0), 100)  # spinning faster (a quiet machine)
    picks = run(chooser, (10.0, 40.0), 20 * PROBE_EVERY)  # spinning now 4x slower (contended)
    late = picks[-4 * PROBE_EVERY:]
    assert late.count(0) > late.count(1)
    # a clear loser is probed rarely
    assert late.count(1) <= -(-len(late) // (PROBE_EVERY * RARE_FACTOR)) + 1


def test_one_stalled_run_does_not_hand_the_choice_to_the_slower_option():
    """bf16 (3 ms an image) against fp32 (6 ms): one bf16 batch stalled 10x by another process must not
    make fp32 look cheaper (it would then keep fp32 until rare probes brought bf16's average back)."""
    chooser = FasterOfTwo()
    run(chooser, (3.0, 6.0), 50)
    chooser.record(0, 30.0)  # the stalled run
    picks = run(chooser, (3.0, 6.0), 50)
    assert picks.count(0) >= 49
    # a lasting change (near ties make bf16 plus their re-check cost 8 ms) still turns the choice
    picks = run(chooser, (8.0, 6.0), 20)
    assert picks[-10:].count(1) >= 9


def test_a_probe_measures_the_other_option_afresh_so_the_choice_follows_the_traffic():
    """A tier's chooser: near-tie traffic made the tier plus its re-check cost 1.6x fp32; when the traffic
    turns clear (the tier now half of fp32) the tier serves again after one probe, within PROBE_EVERY runs
    (averaging the probe into the old figure kept fp32 for several probe periods)."""
    chooser = FasterOfTwo(rare_factor=1)
    run(chooser, (9.6, 6.0), 300)
    assert chooser.best() == 1
    picks = run(chooser, (3.0, 6.0), PROBE_EVERY + 4)
    assert chooser.best() == 0 and picks[-4:] == [0, 0, 0, 0]
    # and back: near ties again, the tier loses within a few runs and fp32 serves (bar a probe)
    picks = run(chooser, (9.6, 6.0), 20)
    assert chooser.best() == 1 and picks[-10:].count(1) >= 9


@pytest.mark.parametrize("mode", ["off", "on", "adaptive"])
def test_server_classifies_in_every_spinning_mode(server_factory, registry_copy, photos, mode):
    server = server_factory(registry_copy, "--intra-op-spinning", mode)
    stub = pb_grpc.InferenceStub(server.channel())
    for _ in range(3):  # adaptive: the first lone runs measure both sessions
        response = stub.Classify(pb.ClassifyRequest(images=[photos["chelsea"], photos["coffee"]], top_k=1),
                                 timeout=60)
        assert response.model == BUILTIN_NAME
        assert response.results[0].predictions[0].index in range(281, 286)  # a cat
        assert response.results[1].predictions[0].index == 967  # espresso
    assert "Traceback" not in server.log()
