import numpy as np
import pytest

from napari_microrestore.core.errors import CancelToken, Cancelled, InputError
from napari_microrestore.core.tiling import apply_tiled, plan_tiles, tile_weights

torch = pytest.importorskip("torch")


def _net(pool: bool):
    torch.manual_seed(0)
    nn = torch.nn
    if not pool:
        # 4 convs 3x3: receptive radius 4
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1),
        ).eval()

    class Tiny(nn.Module):  # a one-level UNet: down by 2 and back
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(16, 1, 3, padding=1)

        def forward(self, x):
            e = torch.relu(self.a(x))
            d = torch.relu(self.b(torch.nn.functional.max_pool2d(e, 2)))
            u = torch.nn.functional.interpolate(d, scale_factor=2, mode="nearest")
            return self.c(torch.cat([e, u], 1))

    return Tiny().eval()


def _run(net, a: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None])[0, 0].numpy()


@pytest.mark.parametrize("shape", [(150, 130), (97, 203)])
def test_tiled_conv_net_equals_whole_image(rng, shape):
    net = _net(pool=False)
    img = rng.normal(size=shape).astype(np.float32)
    whole = _run(net, img)
    tiled = apply_tiled(lambda t: _run(net, t), img, tile=48, halo=4, blend=6)
    assert np.abs(tiled - whole).max() < 1e-5
    # too small a halo is visibly wrong: the test can fail
    bad = apply_tiled(lambda t: _run(net, t), img, tile=48, halo=1, blend=6)
    assert np.abs(bad - whole).max() > 1e-3


def test_tiled_unet_with_downsampling_needs_aligned_tiles(rng):
    net = _net(pool=True)
    img = rng.normal(size=(120, 100)).astype(np.float32)
    whole = _run(net, img)
    # receptive radius: 1 (conv a) + 2*(1 conv b + 1 pool) + 1 conv c ≈ 6; use 8
    tiled = apply_tiled(lambda t: _run(net, t), img, tile=40, halo=8, blend=6, multiple=2)
    assert np.abs(tiled - whole).max() < 1e-5


def test_odd_size_is_padded_to_multiple_and_cropped(rng):
    img = rng.normal(size=(37, 45)).astype(np.float32)
    seen = []

    def fn(t):
        seen.append(t.shape)
        return t * 2

    out = apply_tiled(fn, img, tile=16, halo=2, blend=4, multiple=4)
    assert out.shape == img.shape
    np.testing.assert_allclose(out, img * 2, atol=1e-6)
    assert all(s[0] % 4 == 0 and s[1] % 4 == 0 for s in seen)
    assert len(set(seen)) == 1  # every tile has the same shape


def test_burst_in_single_image_out_and_scale(rng):
    burst = rng.normal(size=(5, 70, 90)).astype(np.float32)
    mean = apply_tiled(lambda t: t.mean(0), burst, tile=32, halo=0, blend=8)
    np.testing.assert_allclose(mean, burst.mean(0), atol=1e-5)
    up = apply_tiled(lambda t: np.repeat(np.repeat(t, 2, -2), 2, -1), burst[0], tile=32,
                     halo=2, blend=8, scale=2)
    np.testing.assert_allclose(up, np.repeat(np.repeat(burst[0], 2, 0), 2, 1), atol=1e-5)


def test_plan_covers_image_and_weights_are_partition_of_unity():
    tiles = plan_tiles((100, 77), 32, halo=3, blend=5)
    wsum = np.zeros((100, 77))
    # as many tiles as 32 px needs (overlap 11: 5 rows, 4 columns), shrunk to share each
    # axis evenly (29 x 28 px, not 32 x 32 with a thin last one)
    assert len(tiles) == 5 * 4 and {t.shape for t in tiles} == {(29, 28)}
    for t in tiles:
        wsum[t.y, t.x] += tile_weights(t, halo=3, blend=5)
    assert (wsum > 0).all()
    # a tile bordering another has zero weight in its halo
    inner = [t for t in tiles if t.inner[0]][0]
    assert (tile_weights(inner, halo=3, blend=5)[:3] == 0).all()
    # single tile when the image is smaller than a tile
    assert len(plan_tiles((20, 20), 64)) == 1


def test_progress_and_cancel(rng):
    img = rng.normal(size=(64, 64)).astype(np.float32)
    calls = []
    apply_tiled(lambda t: t, img, tile=24, halo=2, blend=4, progress=lambda f, m: calls.append(f))
    assert calls[-1] == 1.0 and calls == sorted(calls) and len(calls) > 1
    token = CancelToken()

    def fn(t):
        token.cancel()
        return t

    with pytest.raises(Cancelled):
        apply_tiled(fn, img, tile=24, halo=2, blend=4, cancel=token)


def test_bad_input():
    with pytest.raises(InputError, match="larger than 2 \\* halo"):
        plan_tiles((100, 100), 20, halo=8, blend=8)
    with pytest.raises(InputError, match="2 dimensions"):
        apply_tiled(lambda t: t, np.zeros(5))
    with pytest.raises(InputError, match="expected"):
        apply_tiled(lambda t: t[:-1], np.zeros((40, 40)), tile=20, halo=2, blend=4)
