"""Mixing, shuffling, restoring and multi-host slicing of prepared datasets."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hammer.data import (DataError, Loader, LoaderState, Mixture, eval_batches, load_prepared,
                         mixture_from_specs, prepare, validation_sets)
from hammer.data.index_shuffle import derive_key, permute
from tests.data_helpers import ByteTokenizer, write_jsonl

BLOCK = 8  # a 6-character document + BOS + EOS fills one block exactly, so block i is document i


def make_dataset(directory, letter: str, blocks: int, tokenizer=ByteTokenizer()):
    directory.parent.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(directory.parent / f"{directory.name}.jsonl", [f"{letter}{i:05d}" for i in range(blocks)])
    prepare(tokenizer, [data], directory, block_size=BLOCK, blocks_per_shard=7)
    return load_prepared(directory)


def identify(block: np.ndarray) -> str:
    """The document (= block) a row holds: its letter and number."""
    return bytes(int(t) - 3 for t in block[1:-1]).decode()


@pytest.fixture(scope="module")
def small_and_large(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return make_dataset(root / "a", "a", 23), make_dataset(root / "b", "b", 37)


def test_batches_hold_the_blocks_the_order_names_and_a_seed_fixes_the_order(small_and_large):
    mixture = Mixture(small_and_large)
    loader = Loader(mixture, 6, seed=11)
    batches = [next(loader) for _ in range(4)]
    assert all(b.shape == (6, BLOCK) and b.dtype == np.int32 for b in batches)
    for step, batch in enumerate(batches):
        datasets, blocks = loader.sources(step)
        assert [identify(row) for row in batch] == ["ab"[d] + f"{b:05d}" for d, b in zip(datasets, blocks)]
    again = Loader(Mixture(small_and_large), 6, seed=11)
    np.testing.assert_array_equal(np.stack([next(again) for _ in range(4)]), np.stack(batches))
    other = Loader(mixture, 6, seed=12)
    assert not np.array_equal(np.stack([next(other) for _ in range(4)]), np.stack(batches))


def test_restoring_seed_and_step_gives_exactly_the_next_batches(small_and_large):
    loader = Loader(Mixture(small_and_large), 5, seed=3)
    for _ in range(13):  # past the first epoch of 60 blocks
        next(loader)
    saved = json.loads(json.dumps(loader.state.to_dict()))
    expected = [next(loader) for _ in range(4)]
    restored = Loader(Mixture(small_and_large), 5, seed=0)
    restored.restore(LoaderState.from_dict(saved))
    assert restored.state == LoaderState(3, 13)
    np.testing.assert_array_equal(np.stack([next(restored) for _ in range(4)]), np.stack(expected))
    with pytest.raises(DataError, match="seed=3, step=-1"):
        LoaderState.from_dict({"seed": 3, "step": -1})
    with pytest.raises(DataError, match="seed=-1, step=0"):
        Loader(Mixture(small_and_large), 5, seed=-1)


def test_default_weights_show_every_block_once_per_epoch_in_shuffled_order(small_and_large):
    loader = Loader(Mixture(small_and_large), 4, seed=5)
    epoch = [identify(row) for _ in range(15) for row in next(loader)]
    assert sorted(epoch) == sorted([f"a{i:05d}" for i in range(23)] + [f"b{i:05d}" for i in range(37)])
    assert epoch != sorted(epoch)
    second = [identify(row) for _ in range(15) for row in next(loader)]
    assert sorted(second) == sorted(epoch) and second != epoch


def test_two_hosts_read_disjoint_halves_that_together_are_the_global_batch_and_cover_every_block_once(small_and_large):
    mixture = Mixture(small_and_large)
    whole = Loader(mixture, 6, seed=9)
    hosts = [Loader(Mixture(small_and_large), 6, seed=9, process_index=p, process_count=2) for p in (0, 1)]
    seen = []
    for _ in range(10):  # one epoch of 60 blocks
        halves = [next(h) for h in hosts]
        assert all(h.shape == (3, BLOCK) for h in halves)
        np.testing.assert_array_equal(np.concatenate(halves), next(whole))
        seen += [identify(row) for half in halves for row in half]
    assert len(seen) == len(set(seen)) == 60
    with pytest.raises(DataError, match="multiple of the process count 4"):
        Loader(mixture, 6, process_index=0, process_count=4)


def test_mixing_weights_hold_within_sampling_error(small_and_large):
    loader = Loader(Mixture(small_and_large, weights=[0.7, 0.3]), 16, seed=21)
    draws = [identify(row) for _ in range(100) for row in next(loader)]
    fraction = sum(d.startswith("a") for d in draws) / len(draws)
    sigma = (0.7 * 0.3 / len(draws)) ** 0.5
    assert abs(fraction - 0.7) < 4 * sigma, fraction


def test_an_epoch_of_a_weighted_mixture_holds_each_dataset_its_share_spread_evenly_over_its_blocks(small_and_large):
    mixture = Mixture(small_and_large, weights=[0.7, 0.3])
    assert mixture.counts.tolist() == [42, 18]
    # Dataset a's stream shows all 23 blocks in each round: 42 draws a pass are each block once
    # and 19 of them twice; two passes (84 draws = 3 rounds + 15) each block 3 or 4 times.
    for epochs, a_times, b_times in ((1, {1, 2}, {0, 1}), (2, {3, 4}, {0, 1})):
        datasets, blocks = mixture.locate(4, np.arange(epochs * 60))
        a = np.bincount(blocks[datasets == 0], minlength=23)
        b = np.bincount(blocks[datasets == 1], minlength=37)
        assert a.sum() == 42 * epochs and set(a.tolist()) == a_times
        assert b.sum() == 18 * epochs and set(b.tolist()) == b_times
    assert Mixture(small_and_large, weights=[1, 0]).counts.tolist() == [60, 0]


def test_mixtures_refuse_other_block_sizes_other_tokenizers_and_bad_weights(tmp_path, small_and_large):
    class Other(ByteTokenizer):
        fingerprint = "another-tokenizer"

    other = make_dataset(tmp_path / "o", "o", 5, Other())
    with pytest.raises(DataError, match="another-tokenizer.*byte-tokenizer-for-tests"):
        Mixture([small_and_large[0], other])
    data = write_jsonl(tmp_path / "w.jsonl", ["x" * 14] * 3)
    prepare(ByteTokenizer(), [data], tmp_path / "wide", block_size=16)
    with pytest.raises(DataError, match="blocks of 16 tokens"):
        Mixture([small_and_large[0], load_prepared(tmp_path / "wide")])
    with pytest.raises(DataError, match="non-negative"):
        Mixture(small_and_large, weights=[1, -1])


def test_mixture_specs_take_a_weight_for_every_dataset_or_none(small_and_large):
    a, b = (str(ds.path) for ds in small_and_large)
    assert mixture_from_specs([a, b]).counts.tolist() == [23, 37]
    assert mixture_from_specs([f"{a}:1", f"{b}:3"]).counts.tolist() == [15, 45]
    with pytest.raises(DataError, match="every dataset or for none"):
        mixture_from_specs([f"{a}:1", b])


def test_named_validation_sets_are_read_in_packing_order_and_split_across_hosts(tmp_path):
    make_dataset(tmp_path / "valid" / "zh", "z", 11)
    make_dataset(tmp_path / "valid" / "en", "e", 4)
    sets = validation_sets(tmp_path / "valid")
    assert list(sets) == ["en", "zh"] and len(sets["zh"]) == 11
    hosts = [list(eval_batches(sets["zh"], 4, process_index=p, process_count=2)) for p in (0, 1)]
    assert [len(b) for b in hosts[0]] == [2, 2, 2] and [len(b) for b in hosts[1]] == [2, 2, 1]
    order = [identify(row) for step in zip(*hosts) for half in step for row in half]
    assert order == [f"z{i:05d}" for i in range(11)]
    assert [len(b) for b in eval_batches(sets["zh"], 4, drop_remainder=True)] == [4, 4]
    assert list(validation_sets({"mine": tmp_path / "valid" / "en"})) == ["mine"]


def test_index_shuffle_is_a_bijection_for_every_size_and_fixed_forever_by_its_key():
    for n in (1, 2, 3, 7, 60, 1000, 4097):
        image = permute(np.arange(n), n, derive_key([0, n]))
        assert sorted(image.tolist()) == list(range(n))
    assert permute(np.arange(10), 10, derive_key([1])).tolist() == [7, 2, 0, 8, 6, 3, 9, 4, 5, 1]
    assert permute(np.arange(10), 10, derive_key([2])).tolist() == [3, 1, 2, 4, 6, 8, 5, 0, 7, 9]
    # A huge permutation is evaluated at any index on its own (random access): an index's image does
    # not depend on the others asked with it, 100000 spread indices land on 100000 distinct places
    # in range, and the images are fixed by the key.
    n, key = 500_000_000, derive_key([3])
    spread = np.arange(0, n, 5000)
    image = permute(spread, n, key)
    assert len(np.unique(image)) == len(spread) and 0 <= image.min() and image.max() < n
    assert [permute(np.array([i]), n, key)[0] for i in spread[[0, 1, -1]]] == image[[0, 1, -1]].tolist()
    assert permute(np.array([0, n - 1]), n, key).tolist() == [91367780, 482292969]
