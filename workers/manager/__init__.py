"""Control plane: worker registry and heartbeats, partition leases with epochs, the balancer
(a pure function from observed load to a plan), warm hand-over, failure take-over and hot-tenant
routing. All shared state lives in PostgreSQL; see docs/manager.md."""
