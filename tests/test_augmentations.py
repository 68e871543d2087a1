import pytest
import torch

from jobs.cli import UserError
from jobs.transforms import (AugmentSpec, color_jitter, compose, horizontal_flip, parse_aug_names,
                             random_resized_crop, vertical_flip)


def batch(n=8, h=12, w=10, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_flip_twice_is_identity():
    x = batch()
    assert torch.equal(horizontal_flip(horizontal_flip(x, gen(), p=1.0), gen(), p=1.0), x)
    assert torch.equal(vertical_flip(vertical_flip(x, gen(), p=1.0), gen(), p=1.0), x)
    assert torch.equal(horizontal_flip(x, gen(), p=1.0), x.flip(-1))


def test_flip_is_per_sample():
    x = batch(n=64)
    y = horizontal_flip(x, gen(), p=0.5)
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(y[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_crop_keeps_shape_or_resizes():
    x = batch()
    assert random_resized_crop(x, gen()).shape == x.shape
    assert random_resized_crop(x, gen(), size=(20, 30)).shape == (8, 3, 20, 30)


def test_full_crop_is_identity():
    x = batch()
    y = random_resized_crop(x, gen(), scale=(1.0, 1.0), ratio=(10 / 12, 10 / 12))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_crop_is_a_zoom():
    # a horizontal ramp: a zoomed crop must still be monotone along x and have a smaller range
    x = torch.linspace(0, 1, 32).expand(4, 3, 32, 32).contiguous()
    y = random_resized_crop(x, gen(), scale=(0.2, 0.3), ratio=(1.0, 1.0))
    assert (y[..., 1:] - y[..., :-1] >= -1e-6).all()
    assert (y.amax(-1) - y.amin(-1)).max() < 0.8


def test_jitter_stays_in_range_and_changes_images():
    x = batch(n=16)
    y = color_jitter(x, gen())
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(x, y)


def test_hue_shift_keeps_gray_and_full_turn_is_identity():
    from jobs.transforms import _shift_hue
    gray = torch.rand(2, 1, 5, 5).expand(2, 3, 5, 5)
    torch.testing.assert_close(_shift_hue(gray, torch.tensor([0.3, -0.2])), gray, atol=1e-5, rtol=0)
    x = batch(n=2)
    torch.testing.assert_close(_shift_hue(x, torch.zeros(2)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(_shift_hue(x, torch.ones(2)), x, atol=1e-5, rtol=0)
    # red shifted by 1/3 turn becomes green
    red = torch.zeros(1, 3, 1, 1); red[:, 0] = 1
    torch.testing.assert_close(_shift_hue(red, torch.tensor([1 / 3]))[0, :, 0, 0], torch.tensor([0., 1., 0.]), atol=1e-5, rtol=0)


def test_deterministic_under_seed():
    aug = compose(["flip", "vflip", "crop", "color"], AugmentSpec())
    x = batch()
    assert torch.equal(aug(x, gen(1)), aug(x, gen(1)))
    assert not torch.equal(aug(x, gen(1)), aug(x, gen(2)))


def test_parse_names():
    assert parse_aug_names("none") == []
    assert parse_aug_names("flip,color,crop") == ["flip", "color", "crop"]
    with pytest.raises(UserError, match="unknown augmentation"):
        parse_aug_names("flip,blur")
    assert torch.equal(compose([])(batch(), gen()), batch())


def test_flip_folded_into_crop():
    x = batch()
    full = dict(scale=(1.0, 1.0), ratio=(10 / 12, 10 / 12))
    torch.testing.assert_close(random_resized_crop(x, gen(), flip_p=1.0, **full), x.flip(-1), atol=1e-5, rtol=0)
    # in a composition, flip+crop is one pass that flips about half the images
    aug = compose(["flip", "crop"], AugmentSpec(crop_scale=(1.0, 1.0), crop_ratio=(10 / 12, 10 / 12)))
    y = aug(batch(n=64), gen())
    flipped = sum(torch.allclose(y[i], batch(n=64)[i].flip(-1), atol=1e-5) for i in range(64))
    assert 10 < flipped < 54
