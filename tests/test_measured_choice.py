"""The measured choice between two ways to run (lone-run spinning, a bf16 tier's re-check), and a
server in every spinning mode."""

from __future__ import annotations

import pytest

from conftest import BUILTIN_NAME
from headswap.inference.measured_choice import PROBE_EVERY, RARE_FACTOR, Fastest
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc


def run(chooser: Fastest, costs: tuple[float, ...], runs: int) -> list[int]:
    picks = []
    for _ in range(runs):
        option = chooser.pick()
        chooser.record(option, costs[option])
        picks.append(option)
    return picks


def test_chooser_measures_both_then_keeps_the_faster_and_probes_the_other():
    chooser = Fastest()
    picks = run(chooser, (10.0, 8.0), 2 + 4 * PROBE_EVERY)
    assert picks[:2] == [0, 1]  # each measured once
    rest = picks[2:]
    assert rest.count(0) == 4 and rest.count(1) == len(rest) - 4  # the faster, with periodic probes


def test_chooser_follows_a_change_of_conditions():
    chooser = Fastest()
    run(chooser, (10.0, 8.0), 100)  # spinning faster (a quiet machine)
    picks = run(chooser, (10.0, 40.0), 20 * PROBE_EVERY)  # spinning now 4x slower (contended)
    late = picks[-4 * PROBE_EVERY:]
    assert late.count(0) > late.count(1)
    # a clear loser is probed rarely
    assert late.count(1) <= -(-len(late) // (PROBE_EVERY * RARE_FACTOR)) + 1


def test_one_stalled_run_does_not_hand_the_choice_to_the_slower_option():
    """bf16 (3 ms an image) against fp32 (6 ms): one bf16 batch stalled 10x by another process must not
    make fp32 look cheaper (it would then keep fp32 until rare probes brought bf16's average back)."""
    chooser = Fastest()
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
    chooser = Fastest(rare_factor=1)
    run(chooser, (9.6, 6.0), 300)
    assert chooser.best() == 1
    picks = run(chooser, (3.0, 6.0), PROBE_EVERY + 4)
    assert chooser.best() == 0 and picks[-4:] == [0, 0, 0, 0]
    # and back: near ties again, the tier loses within a few runs and fp32 serves (bar a probe)
    picks = run(chooser, (9.6, 6.0), 20)
    assert chooser.best() == 1 and picks[-10:].count(1) >= 9


def test_many_options_measured_in_turn_then_the_cheapest_serves_and_each_other_is_probed():
    """The batch size choice (8, 4, 2, 1 images): 2 is cheapest per image; 8 and 4 are probed in turn,
    1 (a clear loser) rarely; a change of costs moves the choice."""
    chooser = Fastest(4)
    costs = (6.5, 5.5, 5.0, 9.0)
    picks = run(chooser, costs, 4 + 24 * PROBE_EVERY)
    assert picks[:4] == [0, 1, 2, 3]  # each measured once
    rest = picks[4:]
    assert rest.count(2) >= len(rest) - 24
    assert rest.count(0) >= 6 and rest.count(1) >= 6  # both near options are probed
    assert 1 <= rest.count(3) <= 3  # the clear loser only every PROBE_EVERY * RARE_FACTOR runs
    picks = run(chooser, (6.5, 5.5, 7.0, 9.0), 6 * PROBE_EVERY)  # size 2 got dearer: 4 takes over
    assert chooser.best() == 1 and picks[-PROBE_EVERY + 1:].count(1) >= PROBE_EVERY - 2


def test_one_option_is_always_picked():
    chooser = Fastest(1)
    assert run(chooser, (3.0,), 3 * PROBE_EVERY) == [0] * (3 * PROBE_EVERY)


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
