"""The webhook baseline: a bare Starlette endpoint that only reads the body (no verification, no storage)."""

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def receive(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"received": True, "bytes": len(body)})


app = Starlette(routes=[Route("/webhooks/stripe", receive, methods=["POST"])])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
