"""What an operator does to the control plane from the CLI: drain a worker, plan or apply a
rebalance. The leading manager carries the changes out; these only write the intent."""

from __future__ import annotations

from schema.tables import WorkerState
from workers.config import Settings
from workers.manager import balancer, leases, pg
from workers.manager.errors import UnknownWorker
from workers.manager.manager import apply_plan, plan_now


async def drain(s: Settings, worker_id: str, undo: bool = False) -> WorkerState:
    """Mark the worker draining (the manager hands its partitions over) or, with ``undo``,
    serving again. Returns the new state."""
    state = WorkerState.SERVING if undo else WorkerState.DRAINING
    async with pg.session(s.database_url, "flock-cli") as conn:
        if not await leases.set_worker_state(conn, worker_id, state):
            raise UnknownWorker(f"worker {worker_id!r} is not registered")
        await leases.audit(conn, "worker.undrain" if undo else "worker.drain", worker_id, {})
        await pg.notify(conn, s.requests_topic)
    return state


async def rebalance(s: Settings, apply: bool = False,
                    force: bool = False) -> tuple[balancer.Plan, list[balancer.Move]]:
    """The balancer's plan for the current load; with ``apply``, start it. Returns the plan and
    the moves started."""
    async with pg.session(s.database_url, "flock-cli") as conn:
        plan, _, parts = await plan_now(conn, s, force=force)
        return plan, (await apply_plan(conn, s, plan, parts) if apply else [])
