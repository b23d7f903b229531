"""Thin tasks over claims (retroauth.claims): take a batch of a step's work that no other run holds, and
hand it back when it is done. Ids only."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from retroauth import claims
from tasks import context


# Never cached: the same arguments take the next batch each time.
@task(name="claim-batch", retries=2, retry_delay_seconds=[2, 10], retry_jitter_factor=0.5, cache_policy=NO_CACHE)
def claim_batch(step: str, claim_round: str, size: int, handing_back: list[int] | None = None) -> list[int]:
    """Up to ``size`` ids of the step's work (cases, or submissions for ``send``) that nobody holds and this
    round has not taken yet, leased to the running flow run; empty when nothing is left. ``handing_back``:
    the batch this run just finished, handed back in the same transaction (one task run, not two)."""
    return claims.claim(context.engine(), step, owner=context.claim_owner(), round_id=claim_round, limit=size,
                        handing_back=handing_back or ())


@task(name="release-batch", retries=2, retry_delay_seconds=[2, 10], retry_jitter_factor=0.5, cache_policy=NO_CACHE)
def release_batch(step: str, ids: list[int]) -> int:
    """Hand a worked batch back (done or failed, this round does not take it again)."""
    return claims.release(context.engine(), step, ids, owner=context.claim_owner())
