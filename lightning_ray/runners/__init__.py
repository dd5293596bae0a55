"""Remote runners: agents that run outside the cluster (another process, machine or language) and join a train
run over HTTP.

- `routes.py` / `desk.py`: the task API a train run serves on its runners gateway (`host.py`): lease a task,
  heartbeat, emit rewards, complete or fail; a thin front over the run's task pool.
- `client.py`: `RemoteRunner(url, token).run(agent)` and `lightning-ray runner URL --agent module:fn`, which run
  the same `@lr.rollout` function as the in-cluster workers.
"""
