"""Export a training checkpoint as a plain Hugging Face Llava directory.

A checkpoint holds DeepSpeed shards of the trainable parameters only (ZeRO 2 or 3), the resolved
config and the tokenizer. Export rebuilds the model from the same recipe (frozen parts come from
their own `from_pretrained`), puts the gathered fp32 weights in, merges LoRA adapters, and writes
`LlavaForConditionalGeneration` + tokenizer + image processor + `LlavaProcessor` carrying the chat
template of training. The result loads with transformers alone and generates as it should there: the
tokenizer pads on the left, and `generation_config.json` holds the language model's own settings with
our tokenizer's ids and room for a whole answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vistralv_ray.config import Config, load_config
from vistralv_ray.data import storage
from vistralv_ray.data.runs import CONFIG_FILE, DEEPSPEED_DIR, RUN_INFO_FILE, STATE_FILE, latest_checkpoint_uri
from vistralv_ray.logging import get_logger

log = get_logger(__name__)

EXPORT_INFO_FILE = "vistralv_export.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Without it `generate()` stops after transformers' default of 20 new tokens, mid-sentence.
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class TrainedCheckpoint:
    directory: Path  # local copy of the checkpoint directory
    uri: str  # where it came from (local path or s3:// URI)
    config: Config
    step: int
    tag: str
    precision: str


@contextlib.contextmanager
def open_checkpoint(source: str) -> Iterator[TrainedCheckpoint]:
    """The checkpoint of a run (local or s3://) as a local directory with its config."""
    uri = latest_checkpoint_uri(str(source))
    with contextlib.ExitStack() as stack:
        if storage.is_s3(uri):
            import pyarrow.fs as pafs

            local = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vistralv-ckpt-")))
            fs, path = storage.filesystem_for(uri)
            pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        else:
            local = Path(uri).expanduser().resolve()
        config_path = local / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{uri}: no {CONFIG_FILE} in the checkpoint: not a vistralv-ray checkpoint")
        state = json.loads((local / STATE_FILE).read_text())
        info = json.loads((local / RUN_INFO_FILE).read_text()) if (local / RUN_INFO_FILE).is_file() else {}
        yield TrainedCheckpoint(
            directory=local,
            uri=uri,
            config=load_config(config_path),
            step=int(state["step"]),
            tag=state["tag"],
            precision=info.get("precision", "fp32"),
        )


def trained_model(ckpt: TrainedCheckpoint) -> tuple[torch.nn.Module, object]:
    """(LlavaForConditionalGeneration in fp32 with the trained weights, LoRA merged; assembled model)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vistralv_ray.model.assembly import apply_stage, build_model

    cfg = ckpt.config
    # The trained projector is in the shards; the align run it started from need not exist any more.
    model_cfg = dataclasses.replace(cfg.model, init_projector_from=None)
    assembled = build_model(model_cfg, dtype=torch.float32, attn_implementation="sdpa")
    model = apply_stage(assembled.model, cfg.train.stage, cfg.model.lora)
    state = get_fp32_state_dict_from_zero_checkpoint(
        str(ckpt.directory / DEEPSPEED_DIR), tag=ckpt.tag, exclude_frozen_parameters=True
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    known = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(trainable - set(state))
    unexpected = sorted(set(state) - set(known))
    # Same names, other shapes (another LoRA rank, projector width...): load_state_dict's size error otherwise.
    reshaped = sorted(n for n in set(state) & set(known) if tuple(state[n].shape) != known[n])
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{ckpt.uri}: the checkpoint does not fit the model its config builds "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}, "
            f"other shapes {reshaped[:5]})"
        )
    model.load_state_dict(state, strict=False)
    if cfg.train.stage == "finetune" and cfg.model.lora.enabled:
        model = model.merge_and_unload()
    model.requires_grad_(False)
    model.eval()
    return model, assembled


def build_image_processor(cfg: Config, image_size: int):
    """The vision tower's normalisation (its own preprocessor_config.json) and PIL's bicubic resize,
    with LLaVA's pad-to-square in the image mean for `pad`: the pixels training decodes
    (`decode_to_pixels`, pinned by tests/unit/test_pixel_parity.py)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from vistralv_ray.data.images import pixel_stats

    stats = pixel_stats(cfg.model.vision_tower)
    return LlavaImageProcessorPil(
        do_pad=cfg.model.aspect == "pad",  # pads with int(mean * 255), as training does (`PixelStats.fill`)
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        resample=3,  # PIL's bicubic, as in training
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(stats.mean),
        image_std=list(stats.std),
        do_convert_rgb=True,
    )


def build_processor(cfg: Config, tokenizer, chat_template: str, vision_config):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(cfg, vision_config.image_size),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=cfg.model.vision_feature_select_strategy,
        chat_template=chat_template,
        image_token="<image>",
        num_additional_image_tokens=0,
    )


def resolve_dtype(requested: str, precision: str) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if precision == "bf16" else (torch.float16 if precision == "fp16" else torch.float32)
    if requested not in DTYPES:
        raise ValueError(f"dtype: unknown {requested!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def tokenizer_for_generation(tokenizer):
    """The tokenizer, padding on the left from now on and in what it saves: batched `generate` appends
    every answer on the right, so the prompts must end where the answers start."""
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # what `save_pretrained` writes to tokenizer_config.json
    return tokenizer


def build_generation_config(language_model: str, tokenizer):
    """The language model's own generation settings (its generation_config.json, if it has one) with the
    ids of our tokenizer and `max_new_tokens` for a whole answer (kept where the language model sets it)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(language_model)
    except OSError:  # no generation_config.json: transformers' defaults
        log.info("%s has no generation_config.json: exporting transformers' defaults", language_model)
        config = GenerationConfig()
    # Training ends every answer with the tokenizer's EOS; other stop ids of the language model stay.
    own = config.eos_token_id
    others = [own] if isinstance(own, int) else list(own or [])
    eos = [tokenizer.eos_token_id] + [i for i in others if i != tokenizer.eos_token_id]
    config.eos_token_id = eos[0] if len(eos) == 1 else eos
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    if config.max_new_tokens is None:
        config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    config._from_model_config = False  # it is the export's own now, not derived from config.json
    return config


def save_export(
    model: torch.nn.Module, tokenizer, chat_template: str, cfg: Config, out: Path, max_shard_size="5GB"
) -> None:
    """Write model, tokenizer, processor and generation config of a trained (or assembled) model to OUT."""
    model.config.use_cache = True
    model.generation_config = build_generation_config(cfg.model.language_model, tokenizer)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer = tokenizer_for_generation(tokenizer)
    tokenizer.save_pretrained(out)
    build_processor(cfg, tokenizer, chat_template, model.config.vision_config).save_pretrained(out)


def export(source: str, out: str | Path, dtype: str = "auto", overwrite: bool = False, max_shard_size="5GB") -> Path:
    """Write the Hugging Face directory of a run's latest checkpoint (or the given checkpoint) to OUT.

    The export is built in a hidden sibling directory and renamed to OUT when complete: an interrupted
    export leaves no OUT that looks like a model, and with `overwrite` the old OUT stays in place until
    the new one is whole.
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, and named so nobody mistakes it for a model; a sibling, so the final rename stays on one disk.
    # mkdir, not mkdtemp: the export keeps the umask's permissions, not mkdtemp's owner-only ones.
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        info = _export_into(source, tmp, dtype, max_shard_size)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; what a failed export wrote otherwise
    log.info("exported %s (step %d, %s) to %s", info["source"], info["step"], info["dtype"], out)
    return out


def _swap_in(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and removed only afterwards."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if out.exists():
            out.rmdir()
        new.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)  # the old export back in its place
        raise
    shutil.rmtree(old, ignore_errors=True)


def _export_into(source: str, tmp: Path, dtype: str, max_shard_size) -> dict:
    """Build the whole export in the (empty) directory `tmp`; returns what vistralv_export.json says."""
    with open_checkpoint(source) as ckpt:
        model, assembled = trained_model(ckpt)
        target_dtype = resolve_dtype(dtype, ckpt.precision)
        model.to(target_dtype)
        save_export(model, assembled.tokenizer, assembled.chat_template, ckpt.config, tmp, max_shard_size)
        info = {
            "source": ckpt.uri,
            "step": ckpt.step,
            "stage": ckpt.config.train.stage,
            "lora_merged": bool(ckpt.config.train.stage == "finetune" and ckpt.config.model.lora.enabled),
            "dtype": str(target_dtype).removeprefix("torch."),
            "template": ckpt.config.model.template,
            "aspect": ckpt.config.model.aspect,
            "image_seq_length": assembled.image_seq_length,
        }
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=1, ensure_ascii=False))
    return info
