"""Loading a trained model for inference: an export directory, or a run / checkpoint exported on the fly.

Everything here goes through plain transformers (`LlavaForConditionalGeneration`, `AutoProcessor`):
what chat and eval measure is what a user of the exported directory gets.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vistralv_ray.data import storage
from vistralv_ray.logging import get_logger

log = get_logger(__name__)


EXPORT_MARKERS = ("config.json", "processor_config.json")


def is_export_dir(path: str | Path) -> bool:
    if storage.is_s3(str(path)):
        return all(storage.exists(storage.join(str(path), name)) for name in EXPORT_MARKERS)
    p = Path(path).expanduser()
    return all((p / name).is_file() for name in EXPORT_MARKERS)


@contextlib.contextmanager
def model_directory(source: str) -> Iterator[Path]:
    """An export directory as is (copied down first from s3://); a run or checkpoint (local or
    s3://) exported to a temporary directory."""
    if is_export_dir(source):
        if not storage.is_s3(source):
            yield Path(source).expanduser().resolve()
            return
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory(prefix="vistralv-model-") as tmp:
            fs, path = storage.filesystem_for(source)
            pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            yield Path(tmp)
        return
    from vistralv_ray.inference.export import export

    with tempfile.TemporaryDirectory(prefix="vistralv-export-") as tmp:
        log.info("%s is a run or checkpoint: exporting it to a temporary directory first", source)
        yield export(source, Path(tmp) / "model")


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass
class LoadedModel:
    model: object  # LlavaForConditionalGeneration
    processor: object  # LlavaProcessor
    device: torch.device

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def load_model(directory: str | Path, device: str = "auto") -> LoadedModel:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dev = pick_device(device)
    # bf16 weights run in bf16 on a GPU; on the CPU everything runs in fp32.
    dtype = "auto" if dev.type == "cuda" else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(str(directory), dtype=dtype).to(dev).eval()
    processor = AutoProcessor.from_pretrained(str(directory))
    if processor.tokenizer.padding_side != "left":
        # Exports made before the tokenizer saved left padding: batched generation needs it.
        log.warning("%s: the tokenizer pads on the right (an older export); padding on the left", directory)
        processor.tokenizer.padding_side = "left"
    return LoadedModel(model=model, processor=processor, device=dev)


def generation_kwargs(max_new_tokens: int, temperature: float, top_p: float) -> dict:
    """Greedy decoding at temperature 0, sampling otherwise."""
    if temperature <= 0:
        return {"max_new_tokens": max_new_tokens, "do_sample": False}
    return {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": temperature, "top_p": top_p}


def model_inputs(loaded: LoadedModel, texts: list[str], images: list) -> dict[str, torch.Tensor]:
    """Rendered chat texts (the template adds <s>) and the images of those that hold `<image>`."""
    inputs = loaded.processor(
        text=texts,
        images=images or None,
        padding=True,
        add_special_tokens=False,
        return_tensors="pt",
    )
    out = {k: v.to(loaded.device) for k, v in inputs.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(loaded.model.dtype)
    return out


# Vietnamese writes the tone of "oa", "oe", "uy" at the end of a word on either vowel ("hoà" and
# "hòa"): both spellings are one answer. Decomposed, the tone mark moves after the second vowel.
_TONE_ON_FIRST_VOWEL = re.compile("([oOuU])([\u0300\u0301\u0303\u0309\u0323])([aAeEyY])(?![^\\W\\d_])")


def normalize_answer(text: str) -> str:
    """Case-folded, diacritics kept, one tone-mark placement, punctuation and extra spaces removed:
    "Màu đỏ." -> "màu đỏ"; "Hoà." and "Hòa." -> "hoà"."""
    text = _TONE_ON_FIRST_VOWEL.sub(r"\1\3\2", unicodedata.normalize("NFD", text))
    text = unicodedata.normalize("NFC", text).casefold()
    kept = "".join(ch if not unicodedata.category(ch).startswith("P") else " " for ch in text)
    return " ".join(kept.split())


def answer_matches(reference: str, prediction: str) -> bool:
    """The reference answer is contained in the prediction, as whole words."""
    ref, pred = normalize_answer(reference), normalize_answer(prediction)
    return bool(ref) and f" {ref} " in f" {pred} "
