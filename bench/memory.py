"""RSS with 1,000 streams open at once, for the pass-through proxy and for drain-provider.

The streams run at 1 token/s (200 tokens each), so that all of them are open together and the
figure is memory held per open stream, not CPU. Lanes start 5 ms apart: with four lanes per
channel, each channel's vouchers still arrive in nonce order.
"""

from __future__ import annotations

import json
from typing import Any

from .harness import Rig
from .overhead import load


async def run(rig: Rig, *, quick: bool) -> dict[str, Any]:
    streams = 200 if quick else 1000
    tokens = 20 if quick else 40
    directive = "!demo " + json.dumps({"reply": "word" + " word" * (tokens - 1), "token_delay": 0.25})
    body = {"model": "demo", "messages": [{"role": "user", "content": directive}], "stream": True, "max_tokens": 60}
    result: dict[str, Any] = {"streams": streams}
    for server, paid in ((rig.passthrough, False), (rig.provider, True)):
        idle = server.rss_mb()
        run_ = await load(
            rig, server, concurrency=streams, per_lane=1, paid=paid, body=body, stream=True,
            stagger=0.005, budget=5_000, during=server.rss_mb,
        )  # fmt: skip
        result[server.name] = {"rss_idle_mb": idle, "rss_peak_mb": run_["peak"], "completed": len(run_["latencies"])}
    return result
