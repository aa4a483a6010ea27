"""A cap on request bodies, applied before a byte of an upload is parsed or kept."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """ASGI middleware: a request whose body is over ``max_bytes`` gets 413 and a JSON ``detail``.

    A declared ``Content-Length`` over the cap is refused before reading; a body without one (chunked) is
    counted as it arrives and cut off at the cap.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, detail: str | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.detail = detail or f"request over this server's limit of {max_bytes:,} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        over = False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def answer(message: Message) -> None:
            if not over:
                await send(message)

        try:
            await self.app(scope, counted, answer)
        except _BodyTooLarge:
            pass
        if over:  # whatever the app made of the cut body, the client hears why
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": self.detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass
