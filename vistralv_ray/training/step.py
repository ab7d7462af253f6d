"""One micro-batch through the model: pixels normalised on the device, summed token loss.

The loss is a sum over target tokens; the loop divides by the number of target tokens of the
whole optimizer step across all workers, so any split of the same samples over workers and
micro-batches gives the same gradient as one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vistralv_ray.data.packing import IGNORE_INDEX, TrainBatch

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def normalize_pixels(pixels: torch.Tensor, dtype: torch.dtype, mean=SIGLIP_MEAN, std=SIGLIP_STD) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> normalised [n, 3, H, W] in the model's dtype (done on the device)."""
    x = pixels.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


def model_kwargs(batch: TrainBatch, dtype: torch.dtype) -> dict:
    """The keyword arguments of the Llava forward for a batch (also used to check exports)."""
    pixel_values = normalize_pixels(batch.pixel_values, dtype) if batch.pixel_values.shape[0] else None
    return {
        "input_ids": batch.input_ids,
        "pixel_values": pixel_values,
        "position_ids": batch.position_ids,
        "attention_mask": batch.attention_mask,
        "use_cache": False,
    }


def summed_token_loss(model: torch.nn.Module, batch: TrainBatch, dtype: torch.dtype) -> torch.Tensor:
    """Sum of cross-entropy over the batch's target tokens (targets are already shifted)."""
    kwargs = model_kwargs(batch, dtype)
    pixel_values = kwargs["pixel_values"]
    logits = model(**kwargs).logits.float()
    loss = F.cross_entropy(
        logits.view(-1, logits.shape[-1]), batch.targets.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if pixel_values is None:
        loss = loss + _touch_vision_path(model, batch, dtype)
    return loss


def _touch_vision_path(model: torch.nn.Module, batch: TrainBatch, dtype: torch.dtype) -> torch.Tensor:
    """A zero-valued use of the vision tower and projector for a batch without images.

    Every worker must run the same modules each step: ZeRO-3 gathers parameters with collectives
    and ZeRO reduces projector gradients; a worker that skipped them would hang the others.
    """
    from vistralv_ray.model.assembly import llava_of

    inner = llava_of(model).model
    size = inner.vision_tower.config.image_size
    blank = torch.zeros(1, 3, size, size, dtype=dtype, device=batch.input_ids.device)
    cfg = llava_of(model).config
    features = inner.get_image_features(
        pixel_values=blank,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        return_dict=True,
    ).pooler_output
    return sum(f.sum() for f in features) * 0.0
