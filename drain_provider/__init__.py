"""drain-provider: sell OpenAI-compatible completions, paid per token with DRAIN vouchers."""

__version__ = "0.1.0"
