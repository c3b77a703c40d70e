"""core.orient: turning a burst so that its stage motion runs along the columns, and back."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from napari_microrestore.core import degrade
from napari_microrestore.core.errors import InputError
from napari_microrestore.core.orient import Rotation, net_rotation, rotated_shape

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return gaussian_filter(rng.normal(size=(100, 140)), 2.0).astype(np.float32)


def test_net_rotation_wraps_into_a_half_turn():
    assert net_rotation(None) == 0.0
    assert net_rotation(90.0) == 0.0 and net_rotation(270.0) == 0.0
    assert net_rotation(0.0) == -90.0 and net_rotation(180.0) == -90.0
    assert net_rotation(30.0) == -60.0 and net_rotation(150.0) == 60.0
    # within TOLERANCE_DEG of a quarter turn: the exact quarter turn
    assert net_rotation(179.5) == -90.0 and net_rotation(91.9) == 0.0
    assert net_rotation(92.5) == pytest.approx(2.5) and net_rotation(3.0) == -87.0
    assert net_rotation(179.5, tolerance=0) == pytest.approx(89.5)


@pytest.mark.parametrize("phi", [0.0, 90.0, -90.0, 30.0, -60.0, 89.5, -44.0, 45.0, -80.0])
def test_round_trip_and_canvas(image, phi):
    turn = Rotation(image.shape, phi)
    fwd = turn.forward(image)
    assert fwd.shape == turn.canvas == rotated_shape(image.shape, phi)
    # the canvas holds the whole turned frame (its valid pixels count the frame's area)
    assert abs(turn.valid().sum() - image.size) < 0.02 * image.size
    back = turn.inverse(fwd)
    assert back.shape == image.shape and back.dtype == image.dtype
    diff = (back - image)[10:-10, 10:-10]
    if phi % 90 == 0:
        assert np.abs(diff).max() < 1e-6
    else:  # bicubic there and back on a 2 px-smooth image: a small loss, no shift
        assert np.sqrt((diff ** 2).mean()) < 0.03 * image.std()
        assert np.abs(diff).max() < 0.15 * image.std()


def test_quarter_turns_are_exact(image):
    np.testing.assert_array_equal(Rotation(image.shape, 90.0).forward(image), np.rot90(image))
    np.testing.assert_array_equal(Rotation(image.shape, -90.0).forward(image),
                                  np.rot90(image, -1))
    same = Rotation(image.shape, 0.0)
    assert same.identity
    assert same.forward(image) is image and same.inverse(image) is image  # no copy


def test_a_direction_becomes_vertical():
    """A motion-blur PSF along ``a`` degrees, turned by net_rotation(a), runs along the
    columns."""
    for a in (0.0, 20.0, 60.0, 100.0, 170.0):
        psf = degrade.motion_psf(20, a)
        canvas = np.zeros((81, 81), np.float32)
        h, w = psf.shape
        canvas[40 - h // 2:40 - h // 2 + h, 40 - w // 2:40 - w // 2 + w] = psf
        turned = Rotation(canvas.shape, net_rotation(a)).forward(canvas, mode="bilinear",
                                                                 fill="zeros")
        ys, xs = np.nonzero(turned > 0.3 * turned.max())
        assert np.ptp(ys) >= 17 and np.ptp(xs) <= 1, a


def test_points_follow_the_pixels():
    impulse = np.zeros((101, 121), np.float32)
    impulse[30, 80] = 1.0
    for phi in (30.0, -70.0, 95.0):
        turn = Rotation(impulse.shape, phi)
        out = turn.forward(impulse, mode="bilinear")
        y, x = turn.point(30, 80)
        assert np.unravel_index(out.argmax(), out.shape) == (round(y), round(x))
        assert turn.point(y, x, inverse=True) == pytest.approx((30.0, 80.0))


def test_torch_and_numpy_agree_and_leading_dims(image):
    turn = Rotation(image.shape, 33.0)
    stack = np.stack([image, 2 * image])
    got = turn.forward(torch.from_numpy(stack))
    assert isinstance(got, torch.Tensor) and got.shape == (2, *turn.canvas)
    np.testing.assert_allclose(got.numpy(), turn.forward(stack), atol=1e-6)
    np.testing.assert_allclose(turn.forward(stack)[1], 2 * turn.forward(image), atol=1e-5)


def test_a_crop_turned_back_in_place(image):
    """canvas= keeps a crop's own size: what the turn brings in from outside is filled."""
    turn = Rotation((40, 60), 10.0, canvas=(40, 60))
    out = turn.inverse(image[:40, :60], fill="zeros")
    assert out.shape == (40, 60) and (out == 0).any()
    with pytest.raises(InputError, match="canvas"):
        Rotation((40, 60), 90.0, canvas=(40, 60))


def test_bad_input():
    with pytest.raises(InputError, match="finite"):
        Rotation((10, 10), float("nan"))
    with pytest.raises(InputError, match="expected frames of 10x12"):
        Rotation((10, 12), 20.0).forward(np.zeros((12, 10), np.float32))
    with pytest.raises(InputError, match="mask"):
        Rotation((10, 12), 20.0).valid(np.ones((3, 3), bool))
