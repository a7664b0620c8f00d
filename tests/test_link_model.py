"""The link model (split_alexnet/bench/link.py): exact arithmetic on hand-computed cases.

Spec() is 2 streams, 227 px, fp32. Per image, one stream sends forward 86,528 (conv3) + 18,432 (fc6) +
8,192 (fc7) + 8,192 (fc8) + 2,000 (logits) = 123,344 B and backward the same less the logits (their
backward keeps its own slice: no collective) = 121,344 B: 244,688 B in 9 collectives per step.
"""
import pytest

from split_alexnet.bench import link as lm
from split_alexnet.spec import Spec

LINK = lm.Link("test", bandwidth_gbs=1.0, latency_us=10.0)  # 1e9 B/s, 1e-5 s per collective


def test_collectives_of_a_step():
    coll = lm.collectives(Spec())
    assert [k for k, _ in coll] == ["conv3/fwd", "fc6/fwd", "fc7/fwd", "fc8/fwd", "logits/fwd",
                                    "fc8/bwd", "fc7/bwd", "fc6/bwd", "conv3/bwd"]
    assert sum(b for _, b in coll) == 244_688
    assert sum(b for _, b in lm.collectives(Spec(dtype_bytes=2))) == 244_688 // 2


def test_comm_and_step_time_by_hand():
    spec = Spec()
    # K(64, 1) = 9 x 10 us + 64 x 244,688 B / 1e9 B/s = 90 us + 15,660.032 us
    assert lm.comm_time(spec, 64, LINK) == pytest.approx(0.015750032, rel=1e-12)
    # M = 2: every collective twice, the same bytes: 180 us + 15,660.032 us
    assert lm.comm_time(spec, 64, LINK, 2) == pytest.approx(0.015840032, rel=1e-12)
    p = lm.predict(spec, 64, 1e-3, LINK, 1)  # c = 1 ms per image: C = 64 ms
    assert p["step_s"] == pytest.approx(0.064 + 0.015750032, rel=1e-12)
    assert p["share"] == pytest.approx(0.015750032 / 0.079750032, rel=1e-12)
    p = lm.predict(spec, 64, 1e-3, LINK, 2)  # K < C: T = C + K / M
    assert p["step_s"] == pytest.approx(0.064 + 0.015840032 / 2, rel=1e-12)
    assert lm.step_time(0.01, 0.03, 2) == pytest.approx(0.03 + 0.01 / 2)  # K > C: T = K + C / M
    assert lm.step_time(0.01, 0.03, 1) == pytest.approx(0.04)
    assert lm.link_bound_below_us(spec, LINK) == pytest.approx(244.688, rel=1e-12)


def test_where_communication_dominates():
    spec = Spec()
    # c = 300 us: share <= 50 % iff 90 us <= B (300 - 244.688) us, B >= 1.63: B = 1 is 52.7 %, B = 2 is 49.1 %
    assert lm.predict(spec, 1, 300e-6, LINK)["share"] == pytest.approx(334.688 / 634.688, rel=1e-12)
    assert lm.smallest_batch(spec, 300e-6, LINK, 1, 0.5) == 2
    # c = 200 us < 244.688 us per image on the link: communication dominates at every batch
    assert lm.smallest_batch(spec, 200e-6, LINK, 1, 0.5, limit=4096) is None
    # overlap, M = 2, exposed <= 10 %: with K <= C the exposed part is K / 2 and
    # K / 2 <= C / 9  <=>  (180 us + B 244.688 us) / 2 <= B 1000 us / 9  <=>  B >= 90 / (111.11 - 122.34) < 0: never
    assert lm.smallest_batch(spec, 1e-3, LINK, 2, 0.10, limit=4096) is None
    # c = 3 ms: 90 + 122.344 B <= 333.33 B  <=>  B >= 0.426: the first multiple of 2
    assert lm.smallest_batch(spec, 3e-3, LINK, 2, 0.10) == 2


def test_fit_recovers_an_exact_line():
    sizes = [1 << k for k in range(10, 24, 2)]
    secs = [50e-6 + s / 2e9 for s in sizes]
    latency, bandwidth = lm.fit_link(sizes, secs)
    assert latency == pytest.approx(50e-6, rel=1e-9) and bandwidth == pytest.approx(2e9, rel=1e-9)


def test_compute_from_bench_json():
    split = dict(layout="split", label="split", batch_size=64, step_s=4.0, comm_s=0.3, comm_min_rank_s=0.1)
    single = dict(layout="single", label="single (1 thr)", batch_size=64, step_s=8.0, comm_s=0.0)
    c, source = lm.compute_from_bench(dict(batch_size=64, streams=2, runs=[single, split]))
    assert c == pytest.approx(3.9 / 64) and source.startswith("split")  # step - transfer (min-rank)
    c, source = lm.compute_from_bench(dict(batch_size=64, streams=2, runs=[single]))
    assert c == pytest.approx(8.0 / 2 / 64) and source.startswith("single")
