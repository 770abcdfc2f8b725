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
