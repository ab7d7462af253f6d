"""Row layouts: which column of a source row holds the conversation and where its image comes from.

One `RowLayout` per format, and the published subsets of Vista (HF `Vi-VLM/Vista`) as a table of
presets: each says which column holds the conversation, how the image is found (a column, or a path
made from other columns with an `--image-pattern` such as `wit/images/{id}.jpg`), which image
placeholder the translation left in the text, and which stage the subset is meant for. Explicit
`--conversation-column` / `--image-column` / `--image-pattern` flags override a preset.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, replace

FORMATS = ("llava", "vista", "captions")
STAGES = ("align", "finetune")

_LLAVA_CONVERSATIONS = ("conversations", "conversation", "messages")
# Vista rows may keep the source's English `conversations` next to the Vietnamese ones: Vietnamese first.
_VISTA_CONVERSATIONS = ("vi_conversations", "conversation", "conversations", "messages")
IMAGE_COLUMNS = ("image", "image_name", "file_name", "image_path", "image_file")
CAPTION_COLUMNS = ("caption", "text", "caption_reference_description", "caption_attribution_description")
# Vista's translation wrote LLaVA's `<image>` tag as `<ảnh>` ("image") in some subsets.
VISTA_PLACEHOLDERS = ("<ảnh>",)


class SourceError(ValueError):
    """The input or its layout options cannot work for the whole input (not one bad record)."""


@dataclass(frozen=True)
class RowLayout:
    conversation_columns: tuple[str, ...] = _LLAVA_CONVERSATIONS
    image_columns: tuple[str, ...] = IMAGE_COLUMNS
    # A path under the image root made from the row's columns; when set, image columns are not read.
    image_pattern: str | None = None
    # Tags the source writes for `<image>`; they become `<image>` before the conversation is checked.
    placeholders: tuple[str, ...] = ()
    # A record without its image is rejected (`missing_image`) instead of kept as a text-only record.
    image_required: bool = False
    # The stage the corpus is meant for; text-only records in an `align` corpus are warned about.
    stage: str | None = None

    @property
    def pattern_columns(self) -> tuple[str, ...]:
        return pattern_columns(self.image_pattern) if self.image_pattern else ()


@dataclass(frozen=True)
class VistaSubset:
    """A published Vista subset: its row layout and where its images come from."""

    layout: RowLayout
    images: str  # what --image-root must point at
    sizes: dict[str, int]  # published record counts by split


def _vista(conversation: str, stage: str, **kw) -> RowLayout:
    return RowLayout((conversation,), placeholders=VISTA_PLACEHOLDERS, image_required=True, stage=stage, **kw)


_COCO = "COCO 2017: the train2017/ folder for the train split, val2017/ for validation"
VISTA_SUBSETS: dict[str, VistaSubset] = {
    "vi_llava_conversation": VistaSubset(
        _vista("conversation", "finetune", image_columns=("file_name",)), _COCO, {"train": 107_052, "validation": 4_550}
    ),
    "vi_llava_complex_reasoning": VistaSubset(
        _vista("conversation", "finetune", image_columns=("file_name",)), _COCO, {"train": 112_650, "validation": 4_771}
    ),
    "vi_llava_detail_description": VistaSubset(
        _vista("conversation", "finetune", image_columns=("file_name",)), _COCO, {"train": 111_153, "validation": 4_714}
    ),
    "vi_sharegpt4v": VistaSubset(
        _vista("vi_conversations", "align", image_columns=("image",)),
        "ShareGPT4V's data/ folder (coco/, sam/, llava/, wikiart/, ...): the `image` column is relative to it",
        {"train": 96_913},
    ),
    "vi_wit": VistaSubset(
        _vista("conversation", "align", image_pattern="wit/images/{id}.jpg"),
        "the folder that holds wit/images/<id>.jpg (rows name no image; the id does)",
        {"train": 264_831},
    ),
}

_DEFAULT_LAYOUTS = {
    "llava": RowLayout(),
    # Every Vista row goes with an image: one without is rejected, never trained on as text.
    "vista": RowLayout(_VISTA_CONVERSATIONS, placeholders=VISTA_PLACEHOLDERS, image_required=True),
    "captions": RowLayout((), image_required=True, stage="align"),
}


def pattern_columns(pattern: str) -> tuple[str, ...]:
    """The column names an image pattern uses; a pattern that cannot work is a SourceError."""
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(pattern) if f is not None]
    except ValueError as e:
        raise SourceError(f"--image-pattern {pattern!r}: {e}") from None
    fields = [f for f, _, _ in parsed]
    plain = all(f and not f.isdigit() and not set(f) & set(".[") and not spec and not conv for f, spec, conv in parsed)
    if not fields or not plain:
        raise SourceError(f"--image-pattern {pattern!r}: name plain columns in braces, e.g. 'wit/images/{{id}}.jpg'")
    return tuple(dict.fromkeys(fields))


def get_layout(
    fmt: str,
    subset: str | None = None,
    image_pattern: str | None = None,
    image_column: str | None = None,
    conversation_column: str | None = None,
) -> RowLayout:
    """The layout for `--format` (and `--subset`), with explicit column / pattern flags applied."""
    if fmt not in FORMATS:
        raise SourceError(f"--format: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    layout = _DEFAULT_LAYOUTS[fmt]
    if subset is not None:
        if fmt != "vista":
            raise SourceError(f"--subset {subset!r} needs --format vista")
        if subset not in VISTA_SUBSETS:
            raise SourceError(f"--subset: unknown Vista subset {subset!r}; allowed: {', '.join(VISTA_SUBSETS)}")
        layout = VISTA_SUBSETS[subset].layout
    if conversation_column is not None:
        if fmt == "captions":
            raise SourceError("--conversation-column does not apply to --format captions (it reads a caption)")
        layout = replace(layout, conversation_columns=(conversation_column,))
    if image_column is not None and image_pattern is not None:
        raise SourceError("--image-column and --image-pattern both say where the image is: give one")
    if image_column is not None:
        layout = replace(layout, image_columns=(image_column,), image_pattern=None)
    if image_pattern is not None:
        pattern_columns(image_pattern)
        # A pattern says every record has an image, whatever the format would otherwise allow.
        layout = replace(layout, image_pattern=image_pattern, image_required=True)
    return layout
