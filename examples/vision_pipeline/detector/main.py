"""A tiny detector: a seeded random CNN returning {"boxes", "scores", "labels"} per batch.

Nothing is downloaded. The CNN's weights are random (seed 0); a fixed colour-saliency prior
is added to its objectness so that boxes land on the coloured shapes and the picture makes
sense. Input: a batch Bx3xHxW; output: boxes BxKx4 (x1, y1, x2, y2 in pixels), scores BxK,
labels BxK (int64), with the batch's metadata forwarded so the unbatcher can split it.
"""

from __future__ import annotations

import torch
from arrow_tensor.config import integer, setting
from arrow_tensor.node import run
from torch import nn

STRIDE = 8
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


class TinyDetector(nn.Module):
    """Three strided convs and a 1x1 head: objectness, 4 box terms and class logits per cell."""

    def __init__(self, num_classes: int = 3, top_k: int = 5) -> None:
        super().__init__()
        self.top_k = top_k
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(32, 1 + 4 + num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        out = self.head(self.backbone(x))
        gh, gw = out.shape[-2:]
        # Fixed priors on the un-normalized image: saturated cells are objects, and the
        # dominant colour is the class, so the boxes mean something despite random weights.
        rgb = nn.functional.adaptive_avg_pool2d(x * STD + MEAN, (gh, gw))
        saturation = rgb.amax(dim=1) - rgb.amin(dim=1)
        objectness = 0.1 * out[:, 0] + 10.0 * (saturation - 0.3)
        # Blurred, a uniform shape peaks at its centre instead of forming a plateau.
        objectness = nn.functional.avg_pool2d(
            objectness[:, None], 5, 1, 2, count_include_pad=False
        )[:, 0]
        # Keep local maxima only (a cheap non-maximum suppression over 7x7 cells).
        peaks = objectness == nn.functional.max_pool2d(objectness, 7, stride=1, padding=3)
        objectness = objectness.masked_fill(~peaks, -1e4)
        scores, idx = objectness.flatten(1).sigmoid().topk(self.top_k, dim=1)
        cells = out.flatten(2).gather(2, idx[:, None].expand(-1, out.shape[1], -1))
        colour = rgb.flatten(2).gather(2, idx[:, None].expand(-1, 3, -1))
        cy = (idx // gw).float() * STRIDE + STRIDE / 2 + cells[:, 1].tanh() * STRIDE
        cx = (idx % gw).float() * STRIDE + STRIDE / 2 + cells[:, 2].tanh() * STRIDE
        half = STRIDE * (1.5 + 2.0 * cells[:, 3:5].sigmoid())
        boxes = torch.stack(
            [cx - half[:, 0], cy - half[:, 1], cx + half[:, 0], cy + half[:, 1]], -1
        )
        boxes[..., 0::2] = boxes[..., 0::2].clamp(0, w - 1)
        boxes[..., 1::2] = boxes[..., 1::2].clamp(0, h - 1)
        labels = (0.1 * cells[:, 5:] + 10.0 * colour).argmax(dim=1)
        return {"boxes": boxes, "scores": scores, "labels": labels}


def main() -> None:
    """Serve the model on the ``batch`` input; results go to ``out`` with the batch metadata."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = TinyDetector(top_k=setting("TOP_K", integer(minimum=1, maximum=100), 5)).eval()

    def detect(batch: torch.Tensor, metadata: dict) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return model(batch)

    run(detect)


if __name__ == "__main__":
    main()
