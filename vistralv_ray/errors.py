"""Errors shared across the package: a bad record carries a short machine-readable reason."""

from __future__ import annotations

# The reasons a record can be rejected for; manifests and reports count records by these keys.
REJECT_REASONS = (
    "missing_image",
    "unreadable_image",
    "image_outside_root",
    "decompression_bomb",
    "no_assistant_turn",
    "roles_out_of_order",
    "too_many_image_tags",
    "empty_text",
    "too_long",
    "malformed_record",
)


class RecordError(ValueError):
    """A record that cannot be used; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str, record_id: str | None = None):
        assert reason in REJECT_REASONS, reason
        self.reason = reason
        self.detail = detail
        self.record_id = record_id
        where = f"record {record_id!r}: " if record_id is not None else ""
        super().__init__(f"{where}{reason}: {detail}")

    def with_id(self, record_id: str) -> RecordError:
        return RecordError(self.reason, self.detail, record_id)
