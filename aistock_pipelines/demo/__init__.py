"""Demo assets: a synthetic A-share market in the real AIstock schema, demo snapshot declarations,
demo RD-Agent results. Everything here is deterministic (seeded) so tests can assert exact values."""
