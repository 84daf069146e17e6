"""API keys, per-key limits and who is calling: the tenant side of the API."""
