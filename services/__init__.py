"""services: the running system around the editstream library (Ray actors, Redis transport, CLI)."""
