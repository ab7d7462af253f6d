"""Errors shared across the package: a bad record carries a short machine-readable reason."""

from __future__ import annotations

# The reasons a record can be rejected for; manifests and reports count records by these keys.
REJECT_REASONS = (
    "missing_image",
    "unreadable_image",
    "image_outside_root",
    "decompression_bomb",
    "image_too_large",
    "too_many_pixels",
    "no_assistant_turn",
    "roles_out_of_order",
    "too_many_image_tags",
    "control_token_in_text",
    "empty_text",
    "too_long",
    "text_too_long",
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

    def __reduce__(self):
        # Pickled with its fields (a Ray task raises it to the driver), not with the one-string args.
        return RecordError, (self.reason, self.detail, self.record_id)


class StorageError(RuntimeError):
    """Storage that cannot be used: access denied, a wrong endpoint, a server that stays unreachable
    after the retries. Not a record's fault: the command stops instead of rejecting every record."""
