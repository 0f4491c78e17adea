"""Fuzzing: hostile HTTP requests (fuzz_inputs.py) at the real server, over raw sockets and over
aiohttp's client, and what came back held to the invariants.

    python -m tests.reliability.fuzz --inputs 100000                  # seeded random, 8 at a time
    python -m tests.reliability.fuzz --engine hypothesis --inputs 300 --family admin

Invariants: no 5xx (but 502/504 `upstream_error`, the upstream's failure, were there any); no
traceback in an answer, nor a traceback or an ERROR record in the server's log; no 2xx that was
not paid (a 2xx is allowed only for a POST carrying a valid voucher, or a GET or HEAD of a free
endpoint); nothing written for the channel whose consumer the fuzzer never was; the ledger's
books; and, in a long run, RSS flat: at the end no more than 10% above its size after the first
tenth of the inputs (its size after each tenth is reported, to tell a leak from a cache filling).

The random engine counts every violation and goes on; Hypothesis stops at the first and shrinks
it to a small request, reported as `figures.falsifying`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

from drain_provider.protocol import Domain

from . import audit, report
from .fuzz_inputs import FREE_PATHS, HypothesisDraw, Probe, RandomDraw, Target, probe
from .rig import Rig, build

ADMIN_TOKEN = "reliability-admin-token-0123456789"  # this run's only; the fuzzer never sends it
RSS_GROWTH_LIMIT = 0.10
LONG_RUN = 10_000  # inputs from which RSS is held to the limit


@dataclass
class Answer:
    status: int | None  # None: no HTTP answer (the server closed, or the client refused to send)
    code: str | None = None  # X-DRAIN-Error
    traceback: bool = False


def parse(data: bytes) -> Answer:
    lines = data.partition(b"\r\n\r\n")[0].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return Answer(None, traceback=b"Traceback" in data)
    codes = [line.split(b":", 1)[1].strip().decode() for line in lines if line.lower().startswith(b"x-drain-error:")]
    code = codes[0] if codes else None
    return Answer(int(parts[1]), code, b"Traceback" in data)


async def deliver_raw(port: int, p: Probe, timeout: float) -> Answer:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError):
        return Answer(None)
    data = b""
    try:
        writer.write(p.wire())
        if p.voucher in ("short_body", "binary"):
            writer.write_eof()  # a body cut short must not leave the server waiting for the rest
        await asyncio.wait_for(writer.drain(), timeout)
    except (OSError, TimeoutError):
        pass  # the server may answer (413) and close before reading everything
    try:
        data = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
    return parse(data)


async def deliver_client(session: aiohttp.ClientSession, base: str, p: Probe, timeout: float) -> Answer:
    skip = (b"host", b"content-length", b"connection")
    headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in p.headers if k.lower() not in skip)
    try:
        url = URL(base + p.target.decode("latin-1"), encoded=True)
        async with session.request(
            p.method.decode("latin-1"),
            url,
            data=p.body or None,
            headers=headers,
            timeout=aiohttp.ClientTimeout(timeout),
        ) as resp:
            body = await resp.read()
            return Answer(resp.status, resp.headers.get("X-DRAIN-Error"), b"Traceback" in body)
    except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeError):
        return Answer(None)


def violations(p: Probe, answer: Answer) -> list[str]:
    found = []
    status = answer.status or 0
    if status >= 500 and answer.code != "upstream_error":
        found.append("answers_5xx")
    paid = p.voucher == "valid" and p.method == b"POST"
    free = p.method in (b"GET", b"HEAD") and p.path.decode("latin-1") in FREE_PATHS
    if 200 <= status < 300 and not (paid or free):
        found.append("unpaid_2xx")
    if answer.traceback:
        found.append("tracebacks_in_answers")
    return found


class LogWatch:
    """The provider log's tracebacks and ERROR records: those since the last look, and all seen."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.offset = len(rig.log_text())
        self.seen: list[str] = []

    def problems(self) -> list[str]:
        text = self.rig.log_text()
        new, self.offset = text[self.offset :], len(text)
        lines = [line[:200] for line in new.splitlines() if "level=ERROR" in line or line.startswith("Traceback")]
        self.seen += lines
        return lines


@dataclass
class Tally:
    inputs: int = 0
    by_family: Counter[str] = field(default_factory=Counter)
    by_status: dict[str, Counter[str]] = field(default_factory=dict)
    violations: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    upstream_errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, p: Probe, answer: Answer) -> list[str]:
        found = violations(p, answer)
        with self.lock:
            self.inputs += 1
            self.by_family[p.family] += 1
            self.by_status.setdefault(p.family, Counter())[str(answer.status)] += 1
            self.upstream_errors += answer.code == "upstream_error"
            for name in found:
                self.violations[name] += 1
                examples = self.examples.setdefault(f"{name} ({p.family})", [])
                if len(examples) < 5:
                    examples.append(p.brief())
        return found


async def deliver(rig: Rig, session: aiohttp.ClientSession, p: Probe) -> Answer:
    timeout = 2.0 if p.family == "http" else 15.0
    if p.via_client and p.target.isascii():
        return await deliver_client(session, rig.url, p, timeout)
    return await deliver_raw(rig.port, p, timeout)


async def one(rig: Rig, session: aiohttp.ClientSession, p: Probe, target: Target, tally: Tally) -> list[str]:
    answer = await deliver(rig, session, p)
    if answer.status == 200 and p.signed is not None:
        target.accepted.append(p.signed)
    return tally.add(p, answer)


async def run_random(
    rig: Rig, session: aiohttp.ClientSession, target: Target, inputs: int, *, seed: int, concurrency: int,
    family: str | None, tally: Tally, rss: list[float],
) -> None:  # fmt: skip
    tenth = max(inputs // 10, 1)

    async def worker(w: int) -> None:
        draw = RandomDraw(random.Random(f"{seed}-{w}"))
        for _ in range(w, inputs, concurrency):
            await one(rig, session, probe(draw, target, family), target, tally)
            if tally.inputs % tenth == 0 and len(rss) < tally.inputs // tenth:
                rss.append(_rss(rig))  # after each tenth of the inputs

    await asyncio.gather(*(worker(w) for w in range(concurrency)))


def run_hypothesis(
    rig: Rig, loop: asyncio.AbstractEventLoop, session: aiohttp.ClientSession, target: Target, examples: int,
    family: str | None, tally: Tally, watch: LogWatch, shrink: bool,
) -> str | None:  # fmt: skip
    """Hypothesis's search, in this (worker) thread, each request sent on the event loop of
    `loop`; the falsifying example's report, or None."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
        phases=tuple(Phase) if shrink else tuple(set(Phase) - {Phase.shrink}),
    )
    @given(st.data())
    def example(data: st.DataObject) -> None:
        p = probe(HypothesisDraw(data), target, family)
        found = asyncio.run_coroutine_threadsafe(one(rig, session, p, target, tally), loop).result(120)
        log = watch.problems()
        assert not found and not log, f"{found} {log[:3]}: {p.brief()}"

    try:
        example()
    except AssertionError as exc:
        return str(exc)[:2000]
    return None


def _rss(rig: Rig) -> float:
    assert rig.provider is not None
    return round(rig.provider.rss_mb(), 1)


async def run(
    inputs: int, *, engine: str = "random", family: str | None = None, concurrency: int = 8, seed: int = 1,
    shrink: bool = True, env: dict[str, str] | None = None, keep: bool = False,
) -> dict[str, Any]:  # fmt: skip
    rig = await build(2, env={"ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})})
    mine, victim = rig.consumers
    target = Target(Domain(rig.chain.chain_id, rig.chain.contract), mine.channel_id, bytes(mine.account.key),
                    mine.deposit, victim.channel_id)  # fmt: skip
    tally, rss = Tally(), list[float]()
    falsifying = None
    try:
        await rig.start_provider()
        watch = LogWatch(rig)
        started = time.perf_counter()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
            if engine == "hypothesis":
                loop = asyncio.get_running_loop()
                falsifying = await asyncio.to_thread(
                    run_hypothesis, rig, loop, session, target, inputs, family, tally, watch, shrink
                )
            else:
                await run_random(
                    rig, session, target, inputs, seed=seed, concurrency=concurrency, family=family, tally=tally,
                    rss=rss,
                )  # fmt: skip
        seconds = time.perf_counter() - started
        if not rss or engine == "hypothesis":
            rss.append(_rss(rig))
        rig.stop_provider()
        watch.problems()
        parameters = {"engine": engine, "inputs": inputs, "family": family or "all", "seed": seed}
        if engine == "random":
            parameters["concurrency"] = concurrency
        return _result(rig, target, tally, rss, watch.seen, falsifying, seconds, parameters)
    finally:
        await rig.close(keep=keep)


def _result(
    rig: Rig, target: Target, tally: Tally, rss: list[float], log: list[str], falsifying: str | None,
    seconds: float, parameters: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    touched = sum(
        rig.query(f"SELECT COUNT(*) FROM {table} WHERE channel_id = ?", (target.victim,))[0][0]
        for table in ("vouchers", "usage", "claims")
    )
    growth = rss[-1] - rss[0] if len(rss) > 1 else 0.0
    invariants = {
        "answers_5xx": tally.violations["answers_5xx"],
        "unpaid_2xx": tally.violations["unpaid_2xx"],
        "tracebacks_in_answers": tally.violations["tracebacks_in_answers"],
        "log_error_records": sum("level=ERROR" in line for line in log),
        "log_tracebacks": sum(line.startswith("Traceback") for line in log),
        "hypothesis_falsified": int(falsifying is not None),
        "stranger_channel_rows": touched,
        **audit.books(rig),
    }
    if tally.inputs >= LONG_RUN:
        invariants["rss_growth_over_10_percent"] = int(growth > RSS_GROWTH_LIMIT * rss[0])
    figures: dict[str, Any] = {
        "inputs_sent": tally.inputs,
        "seconds": round(seconds, 1),
        "inputs_per_second": round(tally.inputs / seconds, 1) if seconds else None,
        "by_family": dict(sorted(tally.by_family.items())),
        "by_status": {family: dict(sorted(counts.items())) for family, counts in sorted(tally.by_status.items())},
        "paid_200": len(target.accepted),
        "upstream_errors": tally.upstream_errors,
        "rss_mb_after_warm_up": rss[0] if len(rss) > 1 else None,
        "rss_mb_at_end": rss[-1],
        "rss_growth_mb": round(growth, 1),
        "rss_mb_after_each_tenth": rss if len(rss) > 1 else None,
        "examples": tally.examples,
        "log_problems": log[:10],
    }
    if falsifying is not None:
        figures["falsifying"] = falsifying
    return report.summary("fuzz", parameters, invariants, figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.fuzz", description="Hostile HTTP requests.")
    parser.add_argument("--inputs", type=int, default=100_000, help="requests to send (default 100000)")
    parser.add_argument("--engine", choices=("random", "hypothesis"), default="random")
    parser.add_argument("--family", choices=("paid", "free", "admin", "http"), help="one family only")
    parser.add_argument("--concurrency", type=int, default=8, help="random engine: requests at once (default 8)")
    report.main(
        parser,
        lambda a: run(
            a.inputs, engine=a.engine, family=a.family, concurrency=a.concurrency, seed=a.seed, env=a.env, keep=a.keep
        ),
    )
