"""A load generator process: fixed concurrency, pre-signed vouchers, latencies out.

    python bench/loadgen.py JOB.json OUT.json

JOB: {"url", "body", "lanes": [[header, header, ...], ...], "requests_per_lane", "stream",
"stagger"}. Each
lane is one concurrent client that sends its requests one after another, with its own list of
pre-signed X-DRAIN-Voucher headers (one channel per lane, so nonces arrive in order); a lane
with an empty list sends no voucher (the direct and pass-through paths). OUT: every request's
latency in seconds (to the last byte; to the first content token for streams), and the wall
time of the whole run.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp


async def lane(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: list[str], count: int, stream: bool, delay: float
) -> list[float]:
    await asyncio.sleep(delay)
    latencies = []
    base = {"Content-Type": "application/json"}
    for i in range(count):
        request_headers = {**base, "X-DRAIN-Voucher": headers[i]} if headers else base
        started = time.perf_counter()
        async with session.post(url, data=body, headers=request_headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{url}: {resp.status} {(await resp.text())[:300]}")
            if stream:
                first = 0.0
                async for line in resp.content:
                    if not first and b'"content": "w' in line:
                        first = time.perf_counter() - started
                latencies.append(first)
            else:
                await resp.read()
                latencies.append(time.perf_counter() - started)
    return latencies


async def run(job: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps(job["body"]).encode()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        stagger = job.get("stagger", 0.0)  # seconds between lane starts (keeps one channel's nonces in order)
        results = await asyncio.gather(
            *(
                lane(session, job["url"], body, h, job["requests_per_lane"], job["stream"], i * stagger)
                for i, h in enumerate(job["lanes"])
            )
        )
        wall = time.perf_counter() - started
    return {"latencies": [x for r in results for x in r], "wall": wall}


if __name__ == "__main__":
    job_file, out_file = sys.argv[1], sys.argv[2]
    result = asyncio.run(run(json.loads(Path(job_file).read_text())))
    Path(out_file).write_text(json.dumps(result))
