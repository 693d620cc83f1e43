"""OpenAPI pieces shared by the upload endpoints (the body is parsed by hand, streamed)."""

from __future__ import annotations

from typing import Any


def multipart_body(**fields: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` declaring a multipart body with a required binary `file` part."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}, **fields},
                    }
                }
            },
        }
    }
