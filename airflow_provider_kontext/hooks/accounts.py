"""Find the request budget of each account in each event loop.

The account is the base URL and the token; the token is only ever held here as a short SHA-256
digest, so no key, repr or log line can show it. Each event loop (the triggerer runs all triggers in
one) holds one :class:`~airflow_provider_kontext.hooks.rate_limit.AccountRateLimiter` per account,
made on first use and dropped with the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from typing import TYPE_CHECKING

from airflow_provider_kontext.hooks.rate_limit import AccountRateLimiter

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks.connection import ClientSettings

__all__ = ["AccountRateLimiters", "account_key"]


def account_key(settings: ClientSettings) -> str:
    """Return the account a request counts against: the base URL and a digest of the token.

    Never the token itself.
    """
    digest = hashlib.sha256(settings.token.encode()).hexdigest()[:16] if settings.token else "-"
    return f"{settings.base_url}#{digest}"


class AccountRateLimiters:
    """The :class:`AccountRateLimiter` of each account, per event loop (created on first use)."""

    _budgets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AccountRateLimiter]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def get(cls, settings: ClientSettings) -> AccountRateLimiter | None:
        """Return the rate limiter ``settings``' account draws from in the running loop.

        ``None`` where its connection sets ``max_requests_per_minute`` to 0. Hooks of one account
        that configure different ceilings share the lowest.
        """
        per_minute = settings.max_requests_per_minute
        if not per_minute > 0:
            return None
        budgets = cls._budgets.setdefault(asyncio.get_running_loop(), {})
        key = account_key(settings)
        budget = budgets.get(key)
        if budget is None:
            budget = budgets[key] = AccountRateLimiter(per_minute)
        elif per_minute < budget.per_minute:
            budget.set_ceiling(per_minute)
        return budget
