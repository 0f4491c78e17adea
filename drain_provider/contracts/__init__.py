"""The test contracts: Solidity sources and their built artifacts (ABI + bytecode).

The artifacts are committed so that running the provider needs neither Node nor a compiler;
`node drain_provider/contracts/compile.js` rebuilds them with the pinned solc and a test checks
that the committed files match a fresh build.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def load_artifact(name: str) -> dict[str, Any]:
    """{"contractName", "abi", "bytecode", "compiler"} of DrainChannel (V2), DrainChannelV1 or TestUSDC."""
    text = resources.files(__package__).joinpath("artifacts", f"{name}.json").read_text()
    artifact: dict[str, Any] = json.loads(text)
    return artifact
