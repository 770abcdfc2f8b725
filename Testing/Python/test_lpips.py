from __future__ import annotations

import matplotlib.image as mpimg
import pytest
import torch

from calid.evaluation.lpips import LPIPS

from conftest import SHARED_DATA, require_shared


def _weights():
    return require_shared(SHARED_DATA.parent / "weights" / "lpips_alexnet_features.pth")


def _image(name: str) -> torch.Tensor:
    path = require_shared(SHARED_DATA.parent / "weights" / "lpips_check" / name)
    rgb = torch.from_numpy(mpimg.imread(str(path))[..., :3].copy()).permute(2, 0, 1)[None].float()
    return rgb * 2 - 1


def test_lpips_alex_reproduces_the_authors_reference_values():
    metric = LPIPS(_weights())
    reference = _image("ex_ref.png")
    assert metric(reference, _image("ex_p0.png")).item() == pytest.approx(0.722, abs=5e-4)
    assert metric(reference, _image("ex_p1.png")).item() == pytest.approx(0.138, abs=5e-4)


def test_lpips_is_zero_for_identical_images_and_takes_gray_input():
    metric = LPIPS(_weights())
    gray = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.allclose(metric(gray, gray), torch.zeros(2), atol=1e-7)
    assert (metric(gray, gray.flip(-1)) > 0).all()
    assert not any(p.requires_grad for p in metric.parameters())


def test_lpips_takes_images_smaller_than_alexnet_needs():
    """The evaluation scores only the part of a crop inside the image, which can be 20 pixels a side:
    such pairs are measured (enlarged first), identical ones at 0, different ones above."""
    metric = LPIPS(_weights())
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(3, 1, 20, 27, generator=generator) * 2 - 1
    b = torch.rand(3, 1, 20, 27, generator=generator) * 2 - 1
    assert torch.allclose(metric(a, a), torch.zeros(3), atol=1e-6)
    assert torch.all(metric(a, b) > 0.05)
    assert metric.pooled_features(a).shape == (3, 256)
