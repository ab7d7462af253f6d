"""One micro-batch through the model: pixels normalised on the device, summed token loss.

The loss is a sum over target tokens; the loop divides by the number of target tokens of the
whole optimizer step across all workers, so any split of the same samples over workers and
micro-batches gives the same gradient as one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vistralv_ray.data.images import PixelStats, pixel_stats
from vistralv_ray.data.packing import IGNORE_INDEX, TrainBatch

# SigLIP's (what its preprocessor_config.json says) for callers without a model at hand; the training
# forward normalises with its own tower's config (`tower_pixel_stats`), as the exported processor does.
SIGLIP_STATS = PixelStats(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def normalize_pixels(pixels: torch.Tensor, dtype: torch.dtype, stats: PixelStats = SIGLIP_STATS) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> normalised [n, 3, H, W] in the model's dtype (done on the device)."""
    x = pixels.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    m = torch.tensor(stats.mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(stats.std, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


def tower_pixel_stats(model: torch.nn.Module) -> PixelStats:
    """Mean and std of the model's vision tower, from the preprocessor_config.json where `build_model`
    loaded it from: the file the export's image processor takes them from too."""
    from vistralv_ray.model.assembly import llava_of

    return pixel_stats(llava_of(model).model.vision_tower.config.name_or_path)


def model_kwargs(batch: TrainBatch, dtype: torch.dtype, stats: PixelStats = SIGLIP_STATS) -> dict:
    """The keyword arguments of the Llava forward for a batch (also used to check exports); no
    `pixel_values` for a batch without images, as transformers expects."""
    pixel_values = normalize_pixels(batch.pixel_values, dtype, stats) if batch.pixel_values.shape[0] else None
    return {
        "input_ids": batch.input_ids,
        "pixel_values": pixel_values,
        "position_ids": batch.position_ids,
        "attention_mask": batch.attention_mask,
        "use_cache": False,
    }


def forward_logits(model: torch.nn.Module, batch: TrainBatch, dtype: torch.dtype) -> torch.Tensor:
    """The logits of a batch, with or without images, through the vision-first forward.

    `model` is the Llava model, a peft wrapper of it or a DeepSpeed engine; the call goes through it,
    so the engine's forward and its hooks run. Every micro-batch runs the same modules in the same
    order (vistralv_ray/model/forward.py): training, eval, the probe and the dummy batch alike.
    """
    from vistralv_ray.model.assembly import llava_of
    from vistralv_ray.model.forward import vision_first

    with vision_first(llava_of(model)):
        return model(**model_kwargs(batch, dtype, tower_pixel_stats(model))).logits


def summed_token_loss(model: torch.nn.Module, batch: TrainBatch, dtype: torch.dtype) -> torch.Tensor:
    """Sum of cross-entropy over the batch's target tokens (targets are already shifted)."""
    logits = forward_logits(model, batch, dtype).float()
    return F.cross_entropy(
        logits.view(-1, logits.shape[-1]), batch.targets.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def dummy_batch(pad_id: int) -> TrainBatch:
    """A text-only batch without targets, for a rank that has no batch of its own to run: under
    ZeRO-3 every rank must take part in every forward."""
    ids = torch.full((1, 8), pad_id, dtype=torch.long)
    return TrainBatch(
        input_ids=ids,
        targets=torch.full_like(ids, IGNORE_INDEX),
        position_ids=torch.arange(8).unsqueeze(0),
        attention_mask=None,
        pixel_values=torch.zeros((0, 1, 1, 3), dtype=torch.uint8),
        num_samples=0,
        num_tokens=0,
        num_target_tokens=0,
    )
