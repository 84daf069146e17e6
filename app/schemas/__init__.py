"""Pydantic shapes of what the HTTP API accepts and returns."""
