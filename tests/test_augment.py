"""Weak and strong views of utils/augment.py: shapes, dtypes, image/label alignment, the transform families
and their seeding (the same generator state gives the same view)."""
import numpy as np
import pytest
import torch

from utils.augment import bias_field, strong_2d, strong_3d, weak_2d, weak_3d


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


def test_bias_field_gamma_and_blur_equal_torchio_for_the_same_draws():
    """The LA strong view is the release's torchio pipeline: for the same coefficients, gamma and sigmas,
    RandomBiasField -> RandomGamma -> RandomBlur in torchio and strong_3d here agree within 1e-5 (relative)."""
    tio = pytest.importorskip("torchio")  # a test-only dependency (requirements.txt)
    from torchio.transforms.augmentation.intensity.random_bias_field import BiasField
    from torchio.transforms.augmentation.intensity.random_blur import Blur
    from torchio.transforms.augmentation.intensity.random_gamma import Gamma
    image = (rng(0).normal(size=(37, 30, 24)) * 1.6 + 1.4).astype(np.float32)  # z-scored: negative in places
    for seed in range(5):
        # replay strong_3d's draws: p gate, 20 coefficients, log gamma, p gate, 3 sigmas
        r = rng(seed)
        assert r.random() < 1.0
        coefficients = r.uniform(-0.5, 0.5, 20)
        gamma = float(np.exp(r.uniform(-0.5, 0.5)))
        assert r.random() < 1.0
        sigmas = r.uniform(0.1, 2.0, 3)
        ours = strong_3d(image, rng(seed), p_intensity=1.0, p_blur=1.0)
        t = torch.from_numpy(image)[None]
        t = BiasField(coefficients=coefficients.tolist(), order=3)(t)
        t = Gamma(gamma=gamma)(t)
        t = Blur(std=tuple(sigmas))(t)
        ref = t[0].numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
        assert np.abs(ours - image).max() > 0.1  # the transform did something
    # the field alone is torchio's, also on odd sizes
    for shape in ((112, 112, 80), (37, 30, 23)):
        c = rng(9).uniform(-0.5, 0.5, 20)
        ref = BiasField(coefficients=c.tolist(), order=3).generate_bias_field(torch.zeros((1,) + shape), 3, c.tolist())
        np.testing.assert_allclose(bias_field(shape, c), ref, rtol=1e-6)
    del tio


def test_bias_field_strength_matches_torchio_over_200_draws():
    """The field's max/min ratio over 200 random fields on 112 x 112 x 80: the same distribution as torchio's
    RandomBiasField() (coefficients U(-0.5, 0.5), order 3), far stronger than a field within [0.77, 1.30]."""
    tio = pytest.importorskip("torchio")
    shape = (112, 112, 80)
    ours = []
    for seed in range(200):
        f = bias_field(shape, rng(seed).uniform(-0.5, 0.5, 20))
        ours.append(f.max() / f.min())
    # torchio's own draws (RandomBiasField().get_params), turned into fields by the generator checked equal to
    # torchio's above (torchio's numpy field takes about 0.35 s a draw at this size)
    torch.manual_seed(0)
    transform = tio.RandomBiasField()
    theirs = []
    for _ in range(200):
        f = bias_field(shape, transform.get_params(transform.order, transform.coefficients_range))
        theirs.append(f.max() / f.min())
    ours, theirs = np.log(ours), np.log(theirs)
    # same distribution: medians and quartiles of the log ratio within sampling noise of each other
    for q in (25, 50, 75):
        assert abs(np.percentile(ours, q) - np.percentile(theirs, q)) < 0.35, (q, np.percentile(ours, q),
                                                                               np.percentile(theirs, q))
    assert np.exp(np.median(ours)) > 10  # a median max/min ratio of about 30, not 1.3


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
    # without the intensity transform, the blur alone keeps the mean (scipy's reflecting borders)
    s3 = strong_3d(x, rng(4), p_intensity=0.0, p_blur=1.0)
    assert np.isclose(s3.mean(), x.mean(), atol=1e-2) and s3.std() < x.std()
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
