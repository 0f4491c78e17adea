"""Tools for development and tests, apart from the runtime: `dev` mode, the embedded chain and
the demo model. The provider itself (`python -m drain_provider`) imports nothing from here."""
