"""How the steps hand out their work: given ids in fixed batches, or the day's work claimed batch by batch,
shared with every other run of the same round (on other workers too), one task run per batch."""

from __future__ import annotations

from typing import Any

from prefect.futures import PrefectFuture, as_completed, wait

from retroauth import failpoints
from tasks import context
from tasks.claims import claim_batch, release_batch

IN_FLIGHT = 2  # batches a run works on at once (sends also wait for a slot of the payer's limit)


def batches(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def each_batch(ids: list[int], size: int, work: Any, **kwargs: Any) -> list[PrefectFuture]:
    """``work`` on each batch of ``size`` of the given ids, all submitted at once; every batch runs to its end."""
    futures = [work.submit(b, **kwargs) for b in batches(ids, size)]
    wait(futures)
    return futures


def claimed_batches(step: str, claim_round: str, size: int, work: Any, *, in_flight: int = IN_FLIGHT,
                    **kwargs: Any) -> list[PrefectFuture]:
    """Claim a batch of ``step`` (retroauth.claims), give it to ``work``, hand it back when it is done (well or
    not); keep ``in_flight`` batches going and stop when nothing is left that another run does not hold.
    Runs of the same ``claim_round`` do this at the same time and never get the same batch."""
    if in_flight < 1:
        raise ValueError("in_flight must be at least 1")
    running: dict[PrefectFuture, list[int]] = {}
    finished: list[PrefectFuture] = []
    seen: set[int] = set()
    done_ids: list[int] = []  # the batch just finished: handed back by the next claim, in its transaction
    after_claim = f"{step}.after_claim"
    try:
        while True:
            while len(running) < in_flight:
                ids, done_ids = claim_batch(step, claim_round, size, done_ids), []
                failpoints.hit(after_claim)
                if seen.issuperset(ids):  # nothing left (or only our own batch again, its lease run out): stop
                    if ids:
                        release_batch(step, ids)
                    break
                seen.update(ids)
                running[work.submit(ids, **kwargs)] = ids
            if not running:  # nothing left to claim, nothing being worked: the step is done for this run
                return finished
            done = next(as_completed(list(running)))
            done_ids = running.pop(done)
            finished.append(done)
    finally:  # a claim that failed for good ends the loop: let the batches in hand finish, hand them back
        if done_ids:
            release_batch(step, done_ids)
        for future, ids in running.items():
            future.wait()
            release_batch(step, ids)
            finished.append(future)


def work_in_batches(step: str, ids: list[int] | None, size: int, work: Any, *, claim_round: str | None,
                    in_flight: int = IN_FLIGHT, **kwargs: Any) -> list[PrefectFuture]:
    """The given ``ids`` in fixed batches, or (``ids`` None) the step's whole work claimed batch by batch in
    ``claim_round`` (default: a round of this run's own) with every other run of that round."""
    if ids is not None:
        return each_batch(list(ids), size, work, **kwargs)
    return claimed_batches(step, claim_round or context.claim_round(), size, work, in_flight=in_flight, **kwargs)
