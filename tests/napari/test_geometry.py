"""The widgets' pure geometry: burst windows, pixel boxes of regions, lazy stream views."""

from __future__ import annotations

import numpy as np
import pytest

from napari_microrestore._napari._geometry import (
    Box,
    BurstWindow,
    FrameStack,
    nearest_index,
    pixel_box,
    stream_view,
    view_corners,
)
from napari_microrestore.core.errors import InputError
from napari_microrestore.core.io import LazyStack
from napari_microrestore.engine.restore import _select_frames
from napari_microrestore.engine.stream import window_frames


@pytest.mark.parametrize("n,size", [(20, 5), (20, 4), (5, 5), (3, 5), (7, 1)])
def test_burst_window_matches_the_engines_frame_choice(n, size):
    for centre in range(n):
        w = BurstWindow(n, centre, size)
        assert w.frames == _select_frames(n, centre, size)
        if size <= n:
            assert w.frames == window_frames(centre, size, n)
        assert w.start <= centre < w.stop and w.frames[w.local_reference] == centre
        assert len(w.frames) == min(size, n)


def test_burst_window_text_moves_and_round_trip():
    w = BurstWindow(100, 14, 5, axis=1)
    assert w.describe() == "frames 12-16 (centre 14)"
    assert BurstWindow(100, 0, 5).describe() == "frames 0-4 (centre 0)"
    assert BurstWindow(100, 99, 5).describe() == "frames 95-99 (centre 99)"
    assert w.moved_to(150).centre == 99 and w.moved_to(-3).centre == 0
    assert BurstWindow.from_dict(w.to_dict()) == w
    # stale or foreign values (e.g. a centre outside the stream) are ignored, not trusted
    for stale in (None, "x", {"centre": 3}, {"n_frames": "a", "centre": 1, "size": 2, "axis": 0},
                  {"n_frames": 5, "centre": 9, "size": 2, "axis": 0}):
        assert BurstWindow.from_dict(stale) is None


def test_burst_window_rejects_bad_values():
    with pytest.raises(InputError, match="outside the stream's 0..9"):
        BurstWindow(10, 10, 3)
    with pytest.raises(InputError, match="at least one frame"):
        BurstWindow(10, 2, 0)
    with pytest.raises(InputError, match="at least one frame"):
        BurstWindow(0, 0, 3)


def test_nearest_index_rounds_half_up_and_clips():
    assert [nearest_index(p, 5) for p in (-3, -0.4, 0.5, 1.49, 3.6, 9)] == [0, 0, 1, 1, 4, 4]


def test_pixel_box_covers_the_pixels_a_region_touches():
    # pixel i covers [i - 0.5, i + 0.5)
    assert pixel_box([[2.0, 3.0], [5.0, 7.0]], (10, 10)) == Box(2, 6, 3, 8)
    assert pixel_box([[1.6, 2.4], [4.4, 7.5]], (10, 10)) == Box(2, 5, 2, 8)
    assert pixel_box([[-20, -20], [100, 4.2]], (10, 12)) == Box(0, 10, 0, 5)   # clipped
    assert pixel_box([[3.2, 3.2]], (10, 10)) == Box(3, 4, 3, 4)                 # a point
    with pytest.raises(InputError, match="does not overlap"):
        pixel_box([[20, 20], [30, 30]], (10, 10))
    with pytest.raises(InputError, match="finite"):
        pixel_box([[np.nan, 1]], (10, 10))


def test_box_expand_and_crop_back():
    box = Box(10, 20, 30, 50)
    outer = box.expanded(8, (25, 100))
    assert outer == Box(2, 25, 22, 58) and box.shape == (10, 20) and box.start == (10, 30)
    img = np.arange(100 * 100).reshape(100, 100)
    crop = img[outer.slices]
    np.testing.assert_array_equal(crop[box.within(outer)], img[box.slices])
    big = np.kron(img, np.ones((2, 2), int))    # 2x: each pixel becomes 2x2
    np.testing.assert_array_equal(big[outer.slices[0].start * 2:outer.slices[0].stop * 2,
                                      outer.slices[1].start * 2:outer.slices[1].stop * 2]
                                  [box.within(outer, 2)],
                                  np.kron(img[box.slices], np.ones((2, 2), int)))
    assert box.to_list() == [10, 20, 30, 50]


def test_view_corners_from_camera():
    c = view_corners((0.0, 50.0, 100.0), 2.0, (40, 80))   # 40 x 80 screen px at 2 px/unit
    np.testing.assert_allclose(c.min(0), [40, 80])
    np.testing.assert_allclose(c.max(0), [60, 120])
    assert len(c) == 4
    with pytest.raises(InputError):
        view_corners((0, 0), 0.0, (10, 10))


def test_frame_stack_is_a_lazy_t_y_x_view():
    rng = np.random.default_rng(0)
    data = rng.random((3, 6, 4, 5)).astype(np.float32)          # (C, T, Y, X)
    view = FrameStack(data, axis=1, fixed=[2, 0])
    assert view.shape == (6, 4, 5) and view.ndim == 3 and len(view) == 6
    np.testing.assert_array_equal(np.asarray(view), data[2])
    np.testing.assert_array_equal(view[1:4], data[2, 1:4])
    np.testing.assert_array_equal(view[[0, 5]], data[2, [0, 5]])
    np.testing.assert_array_equal(view[3], data[2, 3])
    np.testing.assert_array_equal(view[..., 1:3], data[2, :, :, 1:3])
    np.testing.assert_array_equal(view[2:4, 1:3, 0:2], data[2, 2:4, 1:3, 0:2])
    assert np.shares_memory(view[1:4], data)                     # no copy of numpy data
    # frames along axis 0 of a 4-D layer, the second axis held at 1
    other = FrameStack(data, axis=0, fixed=[0, 1])
    np.testing.assert_array_equal(np.asarray(other), data[:, 1])
    with pytest.raises(InputError, match="leading axes"):
        FrameStack(data, axis=2, fixed=[0, 0])
    with pytest.raises(InputError, match="at least 3"):
        FrameStack(data[0, 0], axis=0, fixed=[])


def test_frame_stack_reads_only_the_frames_it_is_asked_for():
    read: list[int] = []

    def frame(i: int) -> np.ndarray:
        read.append(i)
        return np.full((4, 5), i, np.float32)

    lazy = LazyStack(frame, (10,), (4, 5), np.float32)
    assert stream_view(lazy) is lazy                             # a (T, Y, X) stream as is
    data = np.zeros((2, 10, 4, 5))
    assert isinstance(stream_view(data, 1, [1, 0]), FrameStack)
    lazy4 = LazyStack(frame, (2, 10), (4, 5), np.float32)        # (Z, T, Y, X), flat index
    view = stream_view(lazy4, 1, [1, 0])
    out = view[3:5]
    np.testing.assert_array_equal(out[:, 0, 0], [13, 14])
    assert sorted(read) == [13, 14]
