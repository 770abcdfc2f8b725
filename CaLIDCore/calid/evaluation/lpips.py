"""LPIPS-alex (v0.1) in plain ``torch.nn``, without importing ``lpips`` or ``torchvision``.

Both packages fail to import with CPU builds of PyTorch (torchvision's wheels
link CUDA builds), so the network is rebuilt here: AlexNet's five conv layers
(ImageNet weights) + LPIPS's five learned 1x1 heads. Weights, all loaded with
``torch.load(weights_only=True)`` (no code is unpickled):

* AlexNet conv layers: ``weights_path`` or ``$CALID_LPIPS_WEIGHTS`` (a state dict
  with keys ``features.{0,3,6,8,10}.{weight,bias}``), else torchvision's
  checkpoint through ``torch.hub`` (needs internet once).
* Heads: the files installed by the PyPI package ``lpips``
  (``lpips/weights/v0.1/alex.pth``), found without importing it.

Inputs are images in [-1, 1] with 1 or 3 channels (gray is repeated to RGB).
The VAE's perceptual loss uses the same module.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from calid.errors import InputError

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
_CHANNELS = (64, 192, 384, 256, 256)


def _heads_path() -> Path:
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("lpips", "the 'lpips' package (it holds the LPIPS head weights) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "alex.pth"
    if not path.exists():
        raise InputError(path, "LPIPS head weights are missing from the installed 'lpips' package")
    return path


def _alexnet_state(weights_path: str | os.PathLike[str] | None) -> dict[str, torch.Tensor]:
    path = weights_path or os.environ.get("CALID_LPIPS_WEIGHTS")
    if path:
        if not Path(path).exists():
            raise InputError(path, "AlexNet weights for LPIPS not found")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise InputError(path, f"cannot be read as a PyTorch state dict ({error})") from error
    else:
        try:
            state = torch.hub.load_state_dict_from_url(ALEXNET_URL, map_location="cpu", weights_only=True, progress=False)
        except Exception as error:
            raise InputError(
                "LPIPS",
                f"AlexNet weights could not be downloaded ({error}); set CALID_LPIPS_WEIGHTS to a local copy",
            ) from error
    return {k: v for k, v in state.items() if k.startswith("features.")}


class LPIPS(nn.Module):
    """Learned perceptual distance (LPIPS v0.1, AlexNet backbone); frozen.

    ``forward(a, b)`` returns one distance per image pair, shape (N,).
    """

    def __init__(self, weights_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
        )
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _CHANNELS)
        self.shift: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        alexnet = _alexnet_state(weights_path)
        missing = self.features.load_state_dict({k[len("features.") :]: v for k, v in alexnet.items()}, strict=False)
        if missing.missing_keys:
            raise InputError(weights_path or "AlexNet weights", f"missing AlexNet layers: {missing.missing_keys}")
        heads = torch.load(str(_heads_path()), map_location="cpu", weights_only=True)
        for index, head in enumerate(self.heads):
            head.weight.data.copy_(  # type: ignore[operator]
                heads[f"lin{index}.model.1.weight"])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen: no dropout, ever

    #: AlexNet's two max-pools leave nothing of an image under 31 pixels a side (the evaluation scores
    #: only the part of the crop inside the image, which can be that small): such images are enlarged
    #: (bilinear) to this size on their shorter side first. Larger images are used as they are.
    MIN_SIDE = 32
    ENLARGED_SIDE = 64

    def _layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        if min(x.shape[-2:]) < self.MIN_SIDE:
            scale = self.ENLARGED_SIDE / min(x.shape[-2:])
            size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
            x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = (x - self.shift) / self.scale
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in (1, 4, 7, 9, 11):
                outputs.append(x)
        return outputs

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 256) AlexNet conv5 features, averaged over space: the embedding of the
        "Fréchet distance on AlexNet features" (inputs in [-1, 1], like LPIPS)."""
        return self._layers(x)[-1].mean(dim=(2, 3))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        distance = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for head, fa, fb in zip(self.heads, self._layers(a), self._layers(b)):
            na = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            distance = distance + head((na - nb) ** 2).mean(dim=(1, 2, 3))
        return distance
