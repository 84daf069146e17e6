"""Who is calling, and the limits that apply to them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffq.app.auth.apikeys import PRIORITIES, ApiKey, Priority
from diffq.app.settings import Settings

ANONYMOUS_OWNER = "-"
"""The owner of jobs made while auth is off."""


@dataclass(frozen=True)
class Caller:
    """The API key of a request (None while auth is off), with its limits resolved against the settings."""

    key: ApiKey | None
    settings: Settings

    @property
    def owner(self) -> str | None:
        """The key id jobs are owned by and checked against; None while auth is off (no checks)."""
        return self.key.id if self.key is not None else None

    @property
    def scope(self) -> str:
        """Namespace of the caller's Idempotency-Keys and job index."""
        return self.key.id if self.key is not None else ANONYMOUS_OWNER

    @property
    def max_queued_jobs(self) -> int:
        return _or(self.key.max_queued_jobs if self.key else None, self.settings.max_queued_jobs)

    @property
    def max_job_cost(self) -> int:
        return _or(self.key.max_job_cost if self.key else None, self.settings.max_job_cost)

    @property
    def max_event_streams(self) -> int:
        return _or(self.key.max_event_streams if self.key else None, self.settings.max_event_streams)

    @property
    def max_waits(self) -> int:
        """Long polls, event streams and OpenAI-endpoint requests the key may hold open together."""
        return self.settings.max_waits

    @property
    def rate_limit(self) -> str:
        return (self.key.rate_limit if self.key is not None else None) or self.settings.rate_limit

    @property
    def priority(self) -> Priority:
        return self.key.priority if self.key is not None else "normal"

    @property
    def priority_rank(self) -> int:
        """0 for high, 1 for normal, 2 for low: the order queued jobs are served in."""
        return PRIORITIES.index(self.priority)

    @property
    def strip_metadata(self) -> bool:
        return self.key is not None and self.key.strip_metadata

    @property
    def content_credentials(self) -> Literal["required", "optional", "off"]:
        """The C2PA policy of this caller's jobs: its key's own, else the deployment's."""
        own = self.key.content_credentials if self.key is not None else None
        return own or self.settings.content_credentials

    def can_see(self, owner: str | None) -> bool:
        """Whether a job owned by ``owner`` exists for this caller: with auth on, only its own."""
        return self.key is None or owner == self.key.id


def _or(value: int | None, default: int) -> int:
    return value if value else default
