"""What the ACP seller answers: a status, a JSON body (a CheckoutSession or ACP's Error) and extra headers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ErrorType = Literal["invalid_request", "processing_error", "service_unavailable"]


class AcpError(Exception):
    """An ACP protocol-level error: HTTP status plus ACP's Error object (type, code, message, param)."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 type: ErrorType = "invalid_request", headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.type = status, code, message, param, type
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "code": self.code, "message": self.message}
        if self.param is not None:
            out["param"] = self.param
        out.update(self.extra)
        return out

    def response(self) -> AcpResponse:
        return AcpResponse(self.status, self.body(), dict(self.headers))


@dataclass
class AcpResponse:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    replayed: bool = False
