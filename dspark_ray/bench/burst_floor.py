"""The floor under `bench burst`: a server that answers every request with an immediate 429.

`python -m dspark_ray.bench.burst_floor --port 18432`, then `dspark-ray bench burst --url
http://127.0.0.1:18432/v1 --model any`: what a burst costs this machine's client and a minimal
Python (aiohttp) server alone, to set a served figure against. It answers as the router does
over capacity (Retry-After, an OpenAI error body) and knows nothing else.
"""

from __future__ import annotations

import argparse
import json

BODY = json.dumps({"error": {"message": "the server is over capacity; retry later", "type": "rate_limit_error",
                             "param": None, "code": "over_capacity"}}).encode()


def main() -> None:
    from aiohttp import web

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=18432)
    port = parser.parse_args().port

    async def reject(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=429, body=BODY, headers={"Retry-After": "1", "Content-Type": "application/json"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reject)
    web.run_app(app, host="127.0.0.1", port=port, backlog=2048, print=None)


if __name__ == "__main__":
    main()
