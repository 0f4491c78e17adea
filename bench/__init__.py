"""Benchmarks of drain-provider against a direct upstream and a plain pass-through proxy."""
