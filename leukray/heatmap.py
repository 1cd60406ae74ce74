"""Where the model looked: Grad-CAM heat maps (the `grad-cam` package) of a LeukNet for the class it predicted.

The target layer is the backbone's last features block (`LeukNet.features[-1]`, MobileNetV2's final 1x1 conv +
BN + ReLU6: 7x7 cells at 224 px), the one the pooled features and the head read. The map is of the plain image
(the identity view); a package scored with test-time augmentation averages the logits of several views, whose
maps are these maps mirrored and rotated with the image.
"""

from __future__ import annotations

import numpy as np
import torch

from .model import LeukNet


def target_layer(model: LeukNet) -> torch.nn.Module:
    """The last block of the MobileNetV2 backbone."""
    return model.features[-1]


def gradcam(model: LeukNet, images_hwc: np.ndarray, class_indices: list[int], batch_size: int = 16) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] (each scaled to its own maximum) of `images_hwc` (uint8 N x H x W x 3, as
    `decode_image` gives) for the given class of each image, computed `batch_size` images at a time."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if len(images_hwc) != len(class_indices):
        raise ValueError(f"{len(images_hwc)} images but {len(class_indices)} class indices")
    model = model.eval()
    out = []
    with GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
        for i in range(0, len(images_hwc), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images_hwc[i:i + batch_size])).permute(0, 3, 1, 2).float()
            targets = [ClassifierOutputTarget(int(c)) for c in class_indices[i:i + batch_size]]
            out.append(np.asarray(cam(input_tensor=x, targets=targets), dtype=np.float32))
    if not out:
        return np.zeros((0,) + tuple(images_hwc.shape[1:3]), np.float32)
    return np.concatenate(out)


def overlay(image_hwc: np.ndarray, cam: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    """The image with its heat map (jet colours) blended over it, uint8 RGB at the image's size."""
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    h, w = image_hwc.shape[:2]
    if cam.shape != (h, w):
        cam = cv2.resize(cam.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return show_cam_on_image(image_hwc.astype(np.float32) / 255.0, np.clip(cam, 0, 1), use_rgb=True,
                             image_weight=image_weight)
