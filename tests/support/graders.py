"""Graders the tests share."""

from __future__ import annotations

from typing import Any

#: 1.0 when the answer equals the item's `reference` exactly (evaluations of Q&A items).
EXACT: dict[str, Any] = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.reference}}",
    "operation": "eq",
}
