import math

import numpy as np
import pytest

from dermfast.data.sampler import BalancedSampler


def imbalanced(n_neg=2000, n_pos=20, seed=0):
    labels = np.r_[np.zeros(n_neg, np.int64), np.ones(n_pos, np.int64)]
    np.random.default_rng(seed).shuffle(labels)
    return labels


def test_natural_epoch_is_a_permutation():
    labels = imbalanced()
    idx = BalancedSampler(labels, seed=3).rank_indices(0)
    assert sorted(idx.tolist()) == list(range(len(labels)))


def test_balanced_batches_oversample_the_rare_class():
    labels = imbalanced()
    s = BalancedSampler(labels, class_fractions="equal", seed=1)
    idx = s.rank_indices(0)
    assert len(idx) == len(labels)
    assert labels[idx].mean() == pytest.approx(0.5, abs=1e-3)
    pos = idx[labels[idx] == 1]
    assert set(pos.tolist()) == set(np.flatnonzero(labels == 1).tolist())  # every positive used, repeated
    neg = idx[labels[idx] == 0]
    assert len(set(neg.tolist())) == len(neg)  # negatives without replacement while the pool lasts
    # within any window of 64, the positive fraction is near 0.5 (shuffled, not blocked)
    windows = labels[idx][: len(idx) // 64 * 64].reshape(-1, 64).mean(1)
    assert 0.3 < windows.mean() < 0.7 and windows.min() > 0.15


def test_custom_fractions_and_epoch_size():
    labels = np.repeat(np.arange(3), [500, 100, 10])
    s = BalancedSampler(labels, class_fractions={0: 0.2, 1: 0.3, 2: 0.5}, epoch_size=1000, seed=0)
    counts = np.bincount(labels[s.rank_indices(0)], minlength=3)
    assert counts.tolist() == [200, 300, 500]


@pytest.mark.parametrize("keep,expected", [(0.1, 200), (150, 150)])
def test_negative_downsampling_is_redrawn_each_epoch(keep, expected):
    labels = imbalanced()
    s = BalancedSampler(labels, neg_keep=keep, seed=2)
    e0, e1 = s.rank_indices(0), s.rank_indices(1)
    assert (labels[e0] == 0).sum() == expected and (labels[e0] == 1).sum() == 20
    assert set(e0[labels[e0] == 0].tolist()) != set(e1[labels[e1] == 0].tolist())


def test_same_seed_and_epoch_same_order_different_epoch_different_order():
    labels = imbalanced()
    a = BalancedSampler(labels, class_fractions="equal", seed=5)
    b = BalancedSampler(labels, class_fractions="equal", seed=5)
    assert np.array_equal(a.rank_indices(4), b.rank_indices(4))
    assert not np.array_equal(a.rank_indices(4), a.rank_indices(5))
    assert not np.array_equal(a.rank_indices(4), BalancedSampler(labels, class_fractions="equal",
                                                                 seed=6).rank_indices(4))


def test_golden_order_is_machine_independent():
    # PCG64 seeded with [seed, epoch] is specified bit for bit by numpy, so these orders hold on any machine.
    s = BalancedSampler(np.repeat([0, 1], [6, 2]), class_fractions="equal", seed=0)
    assert s.rank_indices(0).tolist() == [6, 5, 4, 6, 7, 2, 6, 3]
    assert s.rank_indices(1).tolist() == [1, 6, 4, 7, 7, 0, 3, 6]


@pytest.mark.parametrize("world", [2, 3, 8])
def test_shards_are_disjoint_and_cover_the_epoch(world):
    labels = imbalanced(n_neg=1001)
    full = BalancedSampler(labels, class_fractions="equal", seed=0).epoch_indices(0)
    shards = [BalancedSampler(labels, class_fractions="equal", seed=0, rank=r, world_size=world).rank_indices(0)
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    positions = np.concatenate([np.arange(r, len(shards[0]) * world, world) for r in range(world)])
    assert len(set(positions.tolist())) == len(positions)  # disjoint slices of one order
    merged = np.empty(len(shards[0]) * world, np.int64)
    for r, s in enumerate(shards):
        merged[r::world] = s
    assert np.array_equal(merged[: len(full)], full)  # the union is the epoch (plus wrap padding)


@pytest.mark.parametrize("ratio,real_frac", [(1.0, 0.5), (3.0, 0.25), (15.0, 1 / 16), (math.inf, 0.0)])
def test_real_synthetic_ratio(ratio, real_frac):
    labels = np.r_[np.zeros(400), np.ones(40), np.zeros(400), np.ones(400)].astype(np.int64)
    source = np.r_[np.zeros(440), np.ones(800)].astype(np.uint8)
    s = BalancedSampler(labels, source, class_fractions="equal", synth_ratio=ratio, epoch_size=3200, seed=0)
    idx = s.rank_indices(0)
    for c in (0, 1):
        sel = idx[labels[idx] == c]
        assert (source[sel] == 0).mean() == pytest.approx(real_frac, abs=0.01)


def test_resume_continues_the_same_sequence():
    labels = imbalanced()
    s = BalancedSampler(labels, class_fractions="equal", seed=9)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(100)]
    state = s.state_dict()
    rest = list(it)
    t = BalancedSampler(labels, class_fractions="equal", seed=9)
    t.load_state_dict(state)
    assert len(t) == len(rest)
    assert list(t) == rest and head + rest == s.rank_indices(2).tolist()
    assert t.state_dict(consumed=64)["position"] == 64


def test_bad_configurations_are_clear_errors():
    labels = imbalanced()
    with pytest.raises(ValueError, match="unlabelled"):
        BalancedSampler(np.array([0, -1]))
    with pytest.raises(ValueError, match="there are no synthetic images"):
        BalancedSampler(labels, synth_ratio=math.inf)
    with pytest.raises(ValueError, match="synthetic images of class 1, but there are none"):
        BalancedSampler(labels, np.r_[np.ones(10), np.zeros(len(labels) - 10)], synth_ratio={1: 2.0})
    with pytest.raises(ValueError, match="unknown class index 5"):
        BalancedSampler(labels, class_fractions={5: 1.0})
    with pytest.raises(ValueError, match="rank 2 not in"):
        BalancedSampler(labels, rank=2, world_size=2)


def test_400k_labels_at_1_to_1000():
    # its speed is measured by benchmarks/bench_sampler.py: no wall-clock limits in tests (CI load varies)
    labels = np.zeros(400_000, np.int64)
    labels[::1000] = 1
    s = BalancedSampler(labels, class_fractions="equal", neg_keep=0.5, seed=0, rank=1, world_size=4)
    idx = s.rank_indices(0)
    assert len(idx) == 50_050 and 0.45 < labels[idx].mean() < 0.55


def test_tiny_epochs_shard_evenly_and_neg_keep_one_keeps_all():
    labels = np.array([0, 0, 1])
    shards = [BalancedSampler(labels, seed=0, rank=r, world_size=8).rank_indices(0) for r in range(8)]
    assert {len(s) for s in shards} == {1}  # fewer images than ranks: wrapped so every rank gets one
    s = BalancedSampler(imbalanced(), neg_keep=1.0, seed=0)
    assert len(s.rank_indices(0)) == 2020  # 1.0 is the fraction "all", not a count of one
