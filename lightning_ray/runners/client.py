"""A remote runner: `RemoteRunner(url, token).run(agent)`, or `lightning-ray runner URL --agent module:fn`.

It runs the same agents as the in-cluster workers (`@lr.rollout` functions, `LitAgent`s), the same way: each
rollout on a thread of its own (`AgentThread`) with its output captured and `emit_reward` working, within
`rollout.timeout_s`; it only asks for its work and reports it over the task API (`routes.py`) instead of calling
the task pool. Per rollout: lease, run the agent against the lease's `base_url` while heartbeating, then
`complete` with the reward it returned or `fail` with how it failed (classified here, as a worker would). A lease
the run takes back (a missed heartbeat, the run stopping) ends the rollout here unreported.

The runner ends after `max_rollouts`, or when the run's gateway has not answered for `patience_s` (the run is
over): `RunnerGone`. A refused request (bad token, bad field) is a `RunnerError`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import Counter
from typing import Any

import httpx

from lightning_ray.agent.api import LoadedAgent, load_agent
from lightning_ray.agent.llm import LLM
from lightning_ray.agent.rewards import EmittedReward, open_reward_sink
from lightning_ray.monitor.errors import classify_outcome
from lightning_ray.rollouts import capture
from lightning_ray.rollouts.isolation import AgentThread

log = logging.getLogger(__name__)
LEASE_WAIT_S = 10.0  # how long one lease call waits for work at the gateway


class RunnerError(RuntimeError):
    """The runners gateway refused a request: `status` and its message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class RunnerGone(RuntimeError):
    """The runners gateway did not answer for `patience_s`: the run is over, or unreachable."""


class RemoteRunner:
    """Runs an agent's rollouts for the train run whose runners gateway is at `url` (RUN_DIR/runners.json)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        name: str = "runner",
        concurrency: int = 1,
        patience_s: float = 30.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency ({concurrency}) must be >= 1")
        self.url, self.token, self.name = url.rstrip("/"), token, name
        self.concurrency, self.patience_s = concurrency, patience_s
        self.counts: Counter[str] = Counter()  # rollouts by how they ended: succeeded, failed, ..., lost
        self.runner_id: str | None = None

    def run(self, agent: str | Any, max_rollouts: int | None = None) -> dict[str, int]:
        """Lease and run rollouts until `max_rollouts` have ended (None: until the run is over, `RunnerGone`).
        Returns how many ended which way."""
        return asyncio.run(self._run(load_agent(agent), max_rollouts))

    async def _run(self, agent: LoadedAgent, max_rollouts: int | None) -> dict[str, int]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = httpx.Timeout(30.0, read=LEASE_WAIT_S + 30.0)
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout) as http:
            settings = await self._call(http, "/runners", {"name": self.name})
            self.runner_id = settings["runner_id"]
            capture.install()  # each rollout's output is kept with it, as a worker keeps it
            await _hook(agent.setup, "setup")
            left = [max_rollouts]  # rollouts still to lease, shared by the slots
            slots = [
                asyncio.ensure_future(self._slot(http, agent, settings, left))
                for _ in range(self.concurrency)
            ]
            try:
                await asyncio.gather(*slots)
            finally:  # one slot's error (the run is gone) ends the others
                for slot in slots:
                    slot.cancel()
                await asyncio.gather(*slots, return_exceptions=True)
                await _hook(agent.teardown, "teardown")
        return dict(self.counts)

    async def _slot(self, http: httpx.AsyncClient, agent: LoadedAgent, settings: dict, left: list) -> None:
        while left[0] is None or left[0] > 0:
            if left[0] is not None:
                left[0] -= 1
            body = {"max_n": 1, "wait_s": LEASE_WAIT_S}
            leases = (await self._call(http, f"/runners/{self.runner_id}/lease", body))["leases"]
            if not leases:
                if left[0] is not None:
                    left[0] += 1
                continue
            ended = await self._rollout(http, agent, settings, leases[0])
            self.counts[ended] += 1

    async def _rollout(self, http: httpx.AsyncClient, agent: LoadedAgent, settings: dict, lease: dict) -> str:
        """One leased rollout, run and reported; returns how it ended ("lost": the lease was taken back)."""
        task_url = f"/tasks/{lease['lease_id']}"
        llm = LLM(
            lease["base_url"],
            api_key=self.token or "EMPTY",
            model=settings["model"],
            prompts=settings.get("prompts"),
            **settings["sampling"],
        )
        loop = asyncio.get_running_loop()
        own = contextvars.copy_context()  # outside the rollout: the runner's requests stay out of its logs

        def send(reward: EmittedReward) -> None:  # in the agent's thread, in order with its LLM calls
            body = {"value": reward.value, "dims": reward.dims}
            call = self._call(http, f"{task_url}/reward", body)
            own.copy().run(asyncio.run_coroutine_threadsafe, call, loop).result()

        with capture.captured() as output, open_reward_sink(lease["rollout_id"], on_emit=send):
            thread = AgentThread(agent.rollout, dict(lease["task"]), llm, name=f"agent-{lease['rollout_id']}")
            running = asyncio.ensure_future(thread.wait(settings["timeout_s"]))
            beating = asyncio.ensure_future(self._heartbeat(http, task_url, settings["heartbeat_s"]))
            await asyncio.wait({running, beating}, return_when=asyncio.FIRST_COMPLETED)
        beating.cancel()
        if not running.done():  # the lease was taken back: the rollout runs elsewhere now
            thread.cancel()
            running.cancel()
            beating.result()  # `RunnerGone` if the gateway stopped answering
            return "lost"
        exception, returned, timed_out = None, None, False
        try:
            exception, returned = running.result().ending()
        except TimeoutError as e:
            thread.cancel()
            exception, timed_out = e, True
        if exception is None:
            path, body = "complete", {"reward": returned}
        else:
            f = classify_outcome(
                exception=exception,
                timed_out=timed_out,
                timeout_s=settings["timeout_s"],
                llm_base_url=llm.base_url,
            )
            path = "fail"
            body = {
                "reason": f.message or f.kind,
                "kind": f.kind,
                "error_type": f.exc_type,
                "traceback": f.traceback,
            }
        try:
            answer = await self._call(http, f"{task_url}/{path}", {**body, "logs": output.getvalue()})
        except RunnerError as e:
            if e.status != 409:
                raise
            return "lost"  # it ended meanwhile (the lease expired): the pool runs it again
        return answer["status"]

    async def _heartbeat(self, http: httpx.AsyncClient, task_url: str, every_s: float) -> None:
        """Renew the lease every `every_s`; returns once the run no longer holds it for this runner."""
        while True:
            await asyncio.sleep(every_s)
            try:
                if not (await self._call(http, f"{task_url}/heartbeat", None))["held"]:
                    return
            except RunnerError:  # 409: ended meanwhile
                return

    async def _call(self, http: httpx.AsyncClient, path: str, body: dict | None) -> dict[str, Any]:
        """POST `body` to `path`; connection failures are retried for `patience_s`, then `RunnerGone`."""
        deadline = asyncio.get_running_loop().time() + self.patience_s
        while True:
            try:
                response = await http.post(path, json=body) if body is not None else await http.post(path)
                break
            except httpx.TransportError as e:
                if asyncio.get_running_loop().time() > deadline:
                    raise RunnerGone(f"{self.url} did not answer for {self.patience_s:g}s ({e!r})") from None
                await asyncio.sleep(1.0)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise RunnerError(response.status_code, f"POST {path}: {message}")
        return response.json()


async def _hook(fn: Any, what: str) -> None:
    """A LitAgent's setup/teardown on a thread of its own (as a worker runs them); a failing setup stops."""
    if fn is None:
        return
    outcome = await AgentThread(fn, name=f"agent-{what}").wait()
    if outcome.error is not None:
        if what == "setup":
            raise RuntimeError(f"the agent's setup raised {outcome.error!r}") from outcome.error
        log.warning("the agent's %s raised %r", what, outcome.error)
