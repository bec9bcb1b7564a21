"""result.json, reading runs back, sweeps, tables."""
