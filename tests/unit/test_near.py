"""The perceptual hash of near copies: what it keeps, what it tells apart, and the
threshold set per training folder."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from dicomnode.training.near import (
    copy_limit,
    distances,
    earlier_copies,
    near_copies,
    near_hash,
    near_threshold,
    nearest,
    nearest_distinct,
    signs,
)
from dicomnode.training.phantoms.hand import generate_hand


def _bits_apart(one: str, other: str) -> int:
    """Differing bits, counted here without the module's packing."""
    return bin(int(one, 16) ^ int(other, 16)).count("1")


def _radiograph(seed: int) -> np.ndarray:
    """A hand phantom: a radiograph's structure (a flat test pattern hashes to noise)."""
    return generate_hand(seed, size=256).pixels.astype(np.float64)


def _jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer), dtype=np.float64) / 255


def _half(pixels: np.ndarray) -> np.ndarray:
    picture = Image.fromarray(pixels.astype(np.float32))
    size = (pixels.shape[1] // 2, pixels.shape[0] // 2)
    return np.asarray(picture.resize(size, Image.Resampling.LANCZOS), dtype=np.float64)


def test_a_lossy_copy_keeps_the_hash_and_another_image_does_not() -> None:
    image = _radiograph(1)
    own = near_hash(image)
    assert len(own) == 64 and own == near_hash(image.copy())
    assert int(own[-1], 16) % 2 == 0  # 255 bits: the last is always clear
    copies = [_jpeg(image, 75), _jpeg(image, 50), _half(image), np.clip(image * 1.1, 0, 1)]
    others = [_radiograph(seed) for seed in range(2, 8)]
    near = [_bits_apart(own, near_hash(copy)) for copy in copies]
    far = [_bits_apart(own, near_hash(other)) for other in others]
    assert max(near) < min(far), (near, far)


def test_distances_count_the_differing_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    hashes = [rng.bytes(32).hex() for _ in range(7)]
    table = distances(signs(hashes[:3]), signs(hashes))
    assert table.tolist() == [[_bits_apart(a, b) for b in hashes] for a in hashes[:3]]
    assert nearest(signs(hashes[:2]), signs(hashes[2:])).tolist() == [
        min(_bits_apart(a, b) for b in hashes[2:]) for a in hashes[:2]
    ]
    assert nearest(signs(hashes[:2]), signs([])).tolist() == [256, 256]
    monkeypatch.setattr("dicomnode.training.near.PAIRS", 5)  # one row at a time
    assert nearest(signs(hashes), signs(hashes[2:])).tolist() == [
        min(_bits_apart(a, b) for b in hashes[2:]) for a in hashes
    ]


def test_the_threshold_is_half_the_nearest_distinct_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dicomnode.training.near.PAIRS", 600 * 50)  # 50 rows at a time
    rng = np.random.default_rng(1)
    hashes = [rng.bytes(32).hex() for _ in range(600)]
    hashes.append(hashes[5])  # the same image twice is not a pair
    least = min(_bits_apart(a, b) for a, b in itertools.combinations(set(hashes), 2))
    assert near_threshold(hashes) == least // 2
    assert near_threshold(hashes[:1]) == 0
    assert near_threshold(["0" * 64, "0" * 63 + "1", "f" * 64]) == 0  # 1 bit apart: 1 // 2


def test_near_copies_within_the_folder_do_not_set_its_threshold() -> None:
    """A folder that holds lossy copies of its own images keeps the threshold its distinct
    images give; the copies themselves lie within it."""
    rng = np.random.default_rng(3)
    hashes = [rng.bytes(32).hex() for _ in range(200)]
    alone = near_threshold(hashes)
    copies = [_flipped(hashes[i], 3 + i % 4) for i in range(0, 40, 4)]  # 3-6 bits away
    assert 10 < alone == near_threshold(hashes + copies)
    assert near_copies(copies, signs(hashes[:40]), alone).all()
    assert not near_copies(copies, signs(hashes[40:]), alone).any()


def test_near_copies_are_nearer_than_the_threshold() -> None:
    trained = ["0" * 64, "f" * 64]
    asked = ["0" * 62 + "0f", "0" * 60 + "ffff", "0f" * 32]  # 4, 16 and 128 bits from the first
    assert near_copies(asked, signs(trained), 16).tolist() == [True, False, False]
    assert near_copies(asked, signs(trained), 0).tolist() == [False, False, False]
    assert near_copies([], signs(trained), 16).tolist() == []


def test_copies_within_a_folder_are_the_nearest_earlier_under_a_third_of_the_median(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("dicomnode.training.near.PAIRS", 300 * 7)  # 7 rows at a time
    rng = np.random.default_rng(2)
    hashes = [rng.bytes(32).hex() for _ in range(300)]
    hashes[40] = _flipped(hashes[3], 5)  # a near copy of an earlier hash
    hashes[41] = _flipped(hashes[3], 2)  # nearer to the same one
    hashes[250] = hashes[100]  # the same hash: 0 bits
    distinct = sorted(set(hashes))
    nearest = nearest_distinct(hashes)
    assert nearest.tolist() == [
        min(_bits_apart(a, b) for b in distinct if b != a) for a in distinct
    ]
    limit = copy_limit(nearest)
    assert limit == -(-int(np.median(nearest)) // 3) and 5 < limit < 100  # ~128 / 3
    expected = [
        min(
            (j for j in range(i) if _bits_apart(hashes[i], hashes[j]) < limit),
            key=lambda j: (_bits_apart(hashes[i], hashes[j]), j),
            default=-1,
        )
        for i in range(len(hashes))
    ]
    found = earlier_copies(hashes, limit)
    assert found.tolist() == expected
    assert {i: found[i] for i in np.flatnonzero(found >= 0)} == {40: 3, 41: 3, 250: 100}
    assert earlier_copies(hashes, 0).tolist() == [-1] * len(hashes)
    assert copy_limit(nearest_distinct(hashes[:1])) == 0


def _flipped(hash_: str, bits: int) -> str:
    """``hash_`` with its first ``bits`` bits flipped."""
    return f"{int(hash_, 16) ^ (((1 << bits) - 1) << 250):064x}"
