"""The consumer kit: a Python DRAIN client.

- `DrainConsumer` (channel.py): open a channel, sign vouchers, read costs back.
- `onchain.py`: approve, open, read and close a channel through plain web3 (minimal ABI).
- `transport.py`: an httpx2 transport for the openai SDK (and LangChain) that signs each request
  (imported on its own: it needs the openai package's httpx2).
- `python -m drain_provider.consumer` (cli.py): open, status, chat, close from a shell.
"""

from .channel import DrainConsumer

__all__ = ["DrainConsumer"]
