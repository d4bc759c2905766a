"""Weak and strong views of utils/augment.py: shapes, dtypes, image/label alignment, the transform families
and their seeding (the same generator state gives the same view)."""
import numpy as np

from utils.augment import smooth_bias_field, strong_2d, strong_3d, weak_2d, weak_3d


def rng(seed):
    return np.random.default_rng(seed)


def volume(shape=(30, 26, 14), seed=0):
    r = rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    label[8:20, 6:18, 3:10] = 1
    image = (label * 2.0 + r.normal(size=shape)).astype(np.float32)
    return image, label


# ---------------------------------------------------------------------------------------------- 3D

def test_weak_3d_shapes_dtypes_alignment():
    image, label = volume()
    for seed in range(12):
        x, y = weak_3d(image, label, (16, 16, 8), rng(seed))
        assert x.shape == y.shape == (16, 16, 8)
        assert x.dtype == np.float32 and y.dtype == np.uint8
        assert x.flags.c_contiguous and y.flags.c_contiguous
        assert set(np.unique(y)) <= {0, 1}
    # the label follows the image: use the label itself as the image
    x, y = weak_3d(label.astype(np.float32), label, (16, 16, 8), rng(3))
    assert np.array_equal(x, y.astype(np.float32))


def test_weak_3d_never_touches_z():
    shape = (20, 18, 10)
    image = np.broadcast_to(np.arange(10, dtype=np.float32), shape).copy()   # value = z index
    for seed in range(16):
        x, _ = weak_3d(image, None, (12, 12, 6), rng(seed))
        z0 = x[0, 0, 0]
        assert np.array_equal(x, np.broadcast_to(z0 + np.arange(6, dtype=np.float32), x.shape))


def test_weak_3d_covers_rotations_and_flips():
    image = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
    outs = {weak_3d(image, None, (4, 4, 2), rng(s))[0].tobytes() for s in range(200)}
    # as UA-MT's RandomRotFlip: rot90 then always a flip, i.e. the 4 reflections of the square
    # (the identity and the pure rotations never occur)
    reflections = {np.ascontiguousarray(np.flip(np.rot90(image, k, axes=(0, 1)), 0)).tobytes() for k in range(4)}
    assert outs == reflections and len(outs) == 4


def test_weak_3d_pads_small_volumes():
    image, label = volume(shape=(10, 12, 6))
    x, y = weak_3d(image, label, (16, 16, 8), rng(0))
    assert x.shape == y.shape == (16, 16, 8)
    assert y.sum() == label.sum()                       # the whole volume fits: no foreground lost
    assert np.isclose(x.sum(), image.sum(), rtol=1e-5)  # padding adds zeros only
    # partly smaller: padded along z only, cropped in x, y
    image, label = volume(shape=(30, 26, 6))
    x, y = weak_3d(image, label, (16, 16, 8), rng(1))
    assert x.shape == (16, 16, 8)
    assert np.all(x[:, :, 0] == 0) and np.all(x[:, :, -1] == 0)  # symmetric pad: 1 slice each side


def test_weak_3d_same_seed_same_output():
    image, label = volume()
    a = weak_3d(image, label, (16, 16, 8), rng(5))
    b = weak_3d(image, label, (16, 16, 8), rng(5))
    c = weak_3d(image, None, (16, 16, 8), rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.array_equal(a[0], c[0]) and c[1] is None   # unlabeled: same draws


def test_bias_field_is_smooth_and_bounded():
    for seed in range(10):
        f = smooth_bias_field((40, 36, 20), rng(seed))
        assert f.shape == (40, 36, 20) and f.dtype == np.float32
        assert 0.7 <= f.min() and f.max() <= 1.35
        assert np.abs(np.diff(f, axis=0)).max() < 0.05


def test_strong_3d_views():
    image, label = volume()
    x, _ = weak_3d(image, label, (16, 16, 8), rng(0))
    keep = x.copy()
    s1 = strong_3d(x, rng(1), p_intensity=1.0, p_blur=1.0)
    s2 = strong_3d(x, rng(2), p_intensity=1.0, p_blur=1.0)
    assert np.array_equal(x, keep)                       # input untouched
    assert s1.shape == x.shape and s1.dtype == np.float32 and s1.flags.c_contiguous
    assert not np.allclose(s1, s2) and not np.allclose(s1, x) and not np.allclose(s2, x)
    assert np.array_equal(strong_3d(x, rng(1)), strong_3d(x, rng(1)))
    assert np.all(np.isfinite(s1))
    # without blur, the intensity transform keeps the minimum where it is
    s3 = strong_3d(x, rng(4), p_intensity=1.0, p_blur=0.0)
    assert np.isclose(s3.min(), x.min(), atol=1e-5)
    # the default probabilities: most views differ from the weak view
    changed = [not np.array_equal(strong_3d(x, rng(s)), x) for s in range(40)]
    assert 28 <= sum(changed) <= 40


# ---------------------------------------------------------------------------------------------- 2D

def slice_2d(shape=(40, 34)):
    label = np.zeros(shape, dtype=np.uint8)
    label[5:15, 5:15] = 1
    label[18:30, 8:20] = 2
    label[20:26, 11:17] = 3
    return label


def test_weak_2d_shapes_alignment_labels():
    label = slice_2d()
    image = label.astype(np.float64) / 3.0
    seen = set()
    for seed in range(20):
        x, y = weak_2d(image, label, (64, 48), rng(seed))
        assert x.shape == y.shape == (64, 48)
        assert x.dtype == np.float32 and y.dtype == np.uint8
        assert x.flags.c_contiguous and y.flags.c_contiguous
        assert set(np.unique(y)) <= {0, 1, 2, 3}
        assert np.array_equal(np.rint(x * 3).astype(np.uint8), y)   # nearest everywhere: aligned
        seen.add(x.tobytes())
    assert len(seen) > 5
    a = weak_2d(image, label, (64, 48), rng(7))
    b = weak_2d(image, None, (64, 48), rng(7))
    assert np.array_equal(a[0], b[0]) and b[1] is None


def test_weak_2d_zoom_is_nearest():
    image = np.arange(12, dtype=np.float64).reshape(3, 4) / 11
    for seed in range(10):
        x, _ = weak_2d(image, None, (30, 40), rng(seed))
        assert set(np.unique(x)) <= set(np.float32(image).ravel()) | {0.0}


def test_strong_2d_views():
    label = slice_2d()
    x, _ = weak_2d(label / 3.0, label, (48, 48), rng(0))
    s1 = strong_2d(x, rng(1), p_jitter=1.0, p_blur=1.0)
    s2 = strong_2d(x, rng(2), p_jitter=1.0, p_blur=1.0)
    assert s1.shape == x.shape and s1.dtype == np.float32
    assert 0.0 <= s1.min() and s1.max() <= 1.0 and 0.0 <= s2.min() and s2.max() <= 1.0
    assert not np.allclose(s1, s2) and not np.allclose(s1, x)
    assert np.array_equal(strong_2d(x, rng(3)), strong_2d(x, rng(3)))
    changed = [not np.array_equal(strong_2d(x, rng(s)), x) for s in range(40)]
    assert 28 <= sum(changed) <= 40
