import pytest
import torch

from bdseal.attacks import AttackConfigError, build_and_poison, build_attack
from bdseal.attacks.nets import dct_matrix
from bdseal.attacks.triggers.freq import block_dct, block_idct, rgb_to_yuv, yuv_to_rgb
from bdseal.data.dataset import ImageDataset


def _mid(shape, seed=0):
    """Images away from 0 and 1 so that clipping does not hide the perturbation."""
    g = torch.Generator().manual_seed(seed)
    return 0.4 + 0.2 * torch.rand(shape, generator=g)


def test_dct_is_orthonormal_and_round_trips():
    d = dct_matrix(32, dtype=torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    x = torch.rand(2, 3, 64, 96, dtype=torch.float64)
    assert torch.allclose(block_idct(block_dct(x, 32), 32), x, atol=1e-10)
    assert torch.allclose(yuv_to_rgb(rgb_to_yuv(x)), x, atol=1e-10)
    # DC coefficient of a block = 32 * block mean (orthonormal scaling)
    assert torch.allclose(block_dct(x, 32)[:, :, 0, 0], x[:, :, :32, :32].mean(dim=(2, 3)) * 32, atol=1e-10)


@pytest.mark.parametrize("size", [32, 64])
def test_zero_magnitude_is_the_identity(size):
    x = torch.rand(2, 3, size, size)
    out = build_attack("freq", magnitude=0).apply(x, phase="train")
    assert torch.allclose(out, x, atol=1e-5)


@pytest.mark.parametrize("size", [32, 64, 224])
def test_perturbation_only_touches_the_chroma_frequencies(size):
    atk = build_attack("freq", magnitude=100)  # +100 at (15,15), (31,31) of U and V (small enough not to clip)
    x = _mid((2, 3, size, size))
    d = (atk.apply(x, phase="train") - x).double() * 255
    coeffs = block_dct(rgb_to_yuv(d), 32)
    mask = atk.coefficient_mask(3, size, size).bool()
    assert torch.allclose(coeffs[:, mask.expand(2, -1, -1, -1)[0]], torch.full((1,), 100.0, dtype=torch.float64), atol=0.05)
    assert coeffs[:, ~mask].abs().max() < 0.05
    assert int(mask.sum()) == 2 * 2 * (size // 32) ** 2  # 2 channels x 2 positions per block
    assert coeffs[:, 0].abs().max() < 0.05  # luma untouched


def test_border_narrower_than_a_window_is_untouched():
    x = _mid((1, 3, 40, 40))
    out = build_attack("freq").apply(x, phase="train")
    assert torch.allclose(out[:, :, 32:], x[:, :, 32:], atol=1e-5) and torch.allclose(out[:, :, :, 32:], x[:, :, :, 32:], atol=1e-5)
    assert (out[:, :, :32, :32] - x[:, :, :32, :32]).abs().max() > 0.05


def test_grey_images_with_luma_channel():
    atk = build_attack("freq", yuv=False, channels=[0], magnitude=100)
    x = _mid((1, 1, 32, 32))
    d = (atk.apply(x, phase="train") - x).double() * 255
    c = block_dct(d, 32)
    assert abs(float(c[0, 0, 15, 15]) - 100) < 0.05 and abs(float(c[0, 0, 31, 31]) - 100) < 0.05


@pytest.mark.parametrize("shape,kw,msg", [((3, 16, 16), {}, "does not fit"), ((1, 32, 32), {}, "needs RGB"),
                                          ((1, 32, 32), {"yuv": False}, "outside the image")])
def test_bad_images_are_clear_errors(shape, kw, msg):
    with pytest.raises(AttackConfigError, match=msg):
        build_attack("freq", **kw).check_image(shape)


def test_bad_positions_are_clear_errors():
    with pytest.raises(AttackConfigError, match="outside a 32x32"):
        build_attack("freq", positions=[[15, 32]])


def test_freq_poisoning_is_clean_label_and_deterministic():
    g = torch.Generator().manual_seed(0)
    train = ImageDataset(torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(4).repeat(50))
    test = ImageDataset(train.x[:40].clone(), train.y[:40].clone())
    ps = build_and_poison(train, test, "freq", rate=0.05, target=0, seed=1)
    p = ps.oracle.is_poison
    assert int(p.sum()) == 10 and (train.y[p] == 0).all() and torch.equal(ps.train.y, train.y)
    assert torch.equal(ps.train.x[~p], train.x[~p]) and not torch.equal(ps.train.x[p], train.x[p])
    again = build_and_poison(train, test, "freq", rate=0.05, target=0, seed=1)
    assert torch.equal(again.train.x, ps.train.x)
