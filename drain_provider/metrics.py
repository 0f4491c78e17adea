"""Prometheus metrics: what the provider served, earned and holds, for GET /metrics.

Each app has its own `Metrics` and its own `CollectorRegistry` (tests build many apps in one
process). The request path pays for one call per request, `Metrics.finish`, at the end of the
access middleware: plain integer additions to dicts keyed by label values (no prometheus-client
child lookup, no lock: everything runs on the event loop). Everything else is read when scraped,
from the objects that already hold it: the gate's reservations in flight and shadowed refusals,
the requests in flight, the claimer's outcomes, the gas gauge's last poll, the chain client's
RPC failures.

Labels stay bounded whatever a client sends: a route is its canonical path ("unmatched" when no
route matched), a model is one the server sells ("other" otherwise), an error code is one of
ours (api/errors.ERRORS) or "none".
"""

from __future__ import annotations

import sys
from bisect import bisect_left
from collections.abc import Container, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from . import __version__
from .requestinfo import RequestInfo
from .states import ClaimStatus, PaymentMode

if TYPE_CHECKING:
    from .chain import ChainClient
    from .chainwatch import ChainWatcher
    from .claimer import Claimer
    from .payments import PaymentGate

# The classic text format, which every Prometheus (and its look-alikes) reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
OTHER_MODEL = "other"
UNMATCHED_ROUTE = "unmatched"
NO_ERROR = "none"
# Seconds. From a local model's first token to a slow provider's queue.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Observations in fixed buckets, cumulated only when scraped."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        buckets, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


class Metrics(Collector):
    """The provider's metrics (see the module docstring). The app's contexts set `sold`, `gate`,
    `watcher`, `claimer` and `chain` once they exist; until then their series are absent."""

    def __init__(self, mode: PaymentMode) -> None:
        # The names sold (api/routing.Routes, whose catalog SIGHUP swaps): a model label is one of them.
        self.sold: Container[str] = ()
        self.mode = mode
        self.requests: dict[tuple[str, int, str], int] = {}
        self.input_tokens: dict[str, int] = {}
        self.output_tokens: dict[str, int] = {}
        self.revenue: dict[str, int] = {}
        self.upstream_latency = Histogram()
        self.ttft = Histogram()
        self.in_flight: set[RequestInfo] = set()
        self.gate: PaymentGate | None = None
        self.watcher: ChainWatcher | None = None
        self.claimer: Claimer | None = None
        self.chain: ChainClient | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # --- the request path: one call per request ---------------------------------------------

    def finish(self, info: RequestInfo, status: int, code: str) -> None:
        """A request ended (`code`: its X-DRAIN-Error, or "none")."""
        key = (info.route, status, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        if info.input_tokens is not None:
            model = info.model if info.model in self.sold else OTHER_MODEL
            assert model is not None
            self.input_tokens[model] = self.input_tokens.get(model, 0) + info.input_tokens
            self.output_tokens[model] = self.output_tokens.get(model, 0) + (info.output_tokens or 0)
            if info.cost:
                self.revenue[model] = self.revenue.get(model, 0) + info.cost
        if info.upstream_head is not None:
            self.upstream_latency.observe(info.upstream_head)
        if info.first_content is not None:
            self.ttft.observe(info.first_content - info.started)

    # --- the scrape ---------------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format of every series (CONTENT_TYPE)."""
        return bytes(generate_latest(self.registry))

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "drain_requests",
            "HTTP requests answered, by route (canonical path), status and X-DRAIN-Error code; a client "
            "that left is status 499.",
            labels=["route", "status", "code"],
        )
        for (route, status, code), count in sorted(self.requests.items()):
            requests.add_metric([route, str(status), code], count)
        yield requests
        for name, documentation, values in (
            (
                "drain_input_tokens",
                "Input tokens of metered requests (paid or free), by model sold.",
                self.input_tokens,
            ),
            ("drain_output_tokens", "Output tokens delivered, by model sold.", self.output_tokens),
            ("drain_revenue_base_units", "Charged, in USDC base units (1e-6 USDC), by model sold.", self.revenue),
        ):
            family = CounterMetricFamily(name, documentation, labels=["model"])
            for model, count in sorted(values.items()):
                family.add_metric([model], count)
            yield family
        yield self.upstream_latency.family(
            "drain_upstream_latency_seconds", "Seconds from calling the upstream to the head of its answer."
        )
        yield self.ttft.family(
            "drain_ttft_seconds", "Seconds from a streamed request's arrival to its first content event relayed."
        )
        yield GaugeMetricFamily("drain_requests_in_flight", "Requests being handled.", value=len(self.in_flight))
        yield GaugeMetricFamily(
            "drain_active_streams",
            "Event streams being relayed to clients.",
            value=sum(1 for info in self.in_flight if info.streaming),
        )
        yield from self._payments()
        yield from self._chain()
        mode = GaugeMetricFamily("drain_payment_mode", "PAYMENT_MODE: 1 for the mode in force.", labels=["mode"])
        for each in PaymentMode:
            mode.add_metric([each.value], 1 if each is self.mode else 0)
        yield mode
        build = GaugeMetricFamily("drain_build_info", "The version running (always 1).", labels=["version", "python"])
        build.add_metric([__version__, ".".join(map(str, sys.version_info[:3]))], 1)
        yield build

    def _payments(self) -> Iterator[Metric]:
        if self.gate is None:
            return
        yield GaugeMetricFamily(
            "drain_reservations_held",
            "Paid requests in flight holding a reservation against their voucher.",
            value=self.gate.reservations_held,
        )
        shadowed = CounterMetricFamily(
            "drain_payment_refusals_shadowed",
            "PAYMENT_MODE=shadow: requests whose payment was refused, served free anyway, by error code.",
            labels=["code"],
        )
        for code, count in sorted(self.gate.shadowed.items()):
            shadowed.add_metric([code], count)
        yield shadowed

    def _chain(self) -> Iterator[Metric]:
        if self.claimer is not None:
            claims = CounterMetricFamily(
                "drain_claims",
                "Claim attempts of the claim cycles, by outcome (states.ClaimStatus).",
                labels=["outcome"],
            )
            for status in ClaimStatus:
                claims.add_metric([status.value], self.claimer.outcomes.get(status, 0))
            yield claims
            yield GaugeMetricFamily(
                "drain_claimer_leader",
                "1 while this instance is the claimer (always on SQLite; one of those sharing a PostgreSQL ledger).",
                value=int(self.claimer.leading),
            )
        gas = None if self.watcher is None else self.watcher.gas
        if gas is not None and gas.balance is not None:
            yield GaugeMetricFamily(
                "drain_gas_balance_wei",
                "The provider account's gas balance at the last chain poll, in wei (1e-18 POL on Polygon).",
                value=gas.balance,
            )
        if self.chain is not None:
            errors = CounterMetricFamily(
                "drain_chain_rpc_errors",
                "Chain RPC calls that failed (no answer, transport or decoding error), by call.",
                labels=["kind"],
            )
            for kind, count in sorted(self.chain.rpc_errors.items()):
                errors.add_metric([kind], count)
            yield errors
