"""Typed application state: one `web.AppKey` per service the handlers use."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import aiohttp
from aiohttp import web

from ..chain import ChainClient, ChainClock
from ..chainwatch import ChainWatcher
from ..claimer import Claimer
from ..closing import Closer
from ..config import Settings
from ..ledger import Ledger
from ..metrics import Metrics
from ..payments import PaymentGate
from ..ratelimit import FailureLimiter
from ..tokens import TokenCounter
from .routing import Routes

SETTINGS = web.AppKey("settings", Settings)
LEDGER = web.AppKey("ledger", Ledger)
CHAIN = web.AppKey("chain", ChainClient)  # the primary contract's client
# One client per contract served (settings.contracts' order, the primary first), on one connection.
CHAINS: web.AppKey[tuple[ChainClient, ...]] = web.AppKey("chains")
GATE = web.AppKey("gate", PaymentGate)
# The models sold and one upstream client per upstream (api/routing.py): what SIGHUP replaces.
ROUTES = web.AppKey("routes", Routes)
# The one HTTP session of every upstream client.
SESSION = web.AppKey("session", aiohttp.ClientSession)
COUNTER = web.AppKey("counter", TokenCounter)
CLOCK = web.AppKey("clock", ChainClock)
CLAIMER = web.AppKey("claimer", Claimer)
CLOSER = web.AppKey("closer", Closer)
WATCHER = web.AppKey("watcher", ChainWatcher)
LIMITER = web.AppKey("limiter", FailureLimiter)
# The threads that count large inputs, off the event loop (api/completions.py).
COUNTING = web.AppKey("counting", ThreadPoolExecutor)
# Set when the server begins to stop: a request cancelled after that was not left by its client.
STOPPING = web.AppKey("stopping", asyncio.Event)
# The app's Prometheus metrics (metrics.py), on its own registry.
METRICS = web.AppKey("metrics", Metrics)
