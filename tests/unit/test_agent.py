"""The agent API: LLM routing, @rollout / LitAgent loading, and emit_reward from wherever an agent runs."""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

import lightning_ray as lr
from lightning_ray.agent import (
    AgentLoadError,
    EmittedReward,
    call_agent,
    coerce_reward,
    current_reward_sink,
    load_agent,
    open_reward_sink,
    rollout_reward,
)
from lightning_ray.agent.urls import ROUTE_PREFIXES, check_role, parse_rollout_url, rollout_url
from lightning_ray.config import SamplingConfig

BASE = "http://127.0.0.1:8123/rollout/AbC-123_xyz/v1"

# ---- LLM -------------------------------------------------------------------------------------------------


def test_llm_for_agent_routes_a_role_and_keeps_settings():
    llm = lr.LLM(base_url=BASE, api_key="secret-token", model="m", temperature=0.7, top_p=0.9, max_tokens=64)
    checker = llm.for_agent("checker")
    assert checker.base_url == "http://127.0.0.1:8123/rollout/AbC-123_xyz/agent/checker/v1"
    assert (checker.api_key, checker.model, checker.temperature, checker.top_p, checker.max_tokens) == (
        "secret-token",
        "m",
        0.7,
        0.9,
        64,
    )
    assert checker.rollout_id == llm.rollout_id == "AbC-123_xyz"
    assert (llm.role, checker.role) == (None, "checker")
    # A role of a role replaces it, it does not nest.
    assert checker.for_agent("solver").base_url == "http://127.0.0.1:8123/rollout/AbC-123_xyz/agent/solver/v1"
    assert "secret-token" not in repr(llm)


def test_llm_rejects_bad_roles_and_non_rollout_urls():
    llm = lr.LLM(base_url=BASE)
    for bad in ["", "a/b", "../x", "x y", "r" * 65]:
        with pytest.raises(ValueError, match="invalid agent role"):
            llm.for_agent(bad)
    with pytest.raises(ValueError, match="not a rollout URL"):
        lr.LLM(base_url="https://api.example.com/v1").for_agent("checker")
    assert lr.LLM(base_url="https://api.example.com/v1").rollout_id is None


def test_llm_for_rollout_and_sampling_kwargs():
    llm = lr.LLM.for_rollout("http://127.0.0.1:9000/", "rid42", model="tiny", max_tokens=32)
    assert llm.base_url == "http://127.0.0.1:9000/rollout/rid42/v1"
    assert llm.sampling_kwargs() == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 32}
    assert lr.LLM(base_url=BASE, top_k=5).sampling_kwargs()["extra_body"] == {"top_k": 5}
    with pytest.raises(ValueError):
        lr.LLM.for_rollout("http://h", "a/b")


def test_llm_sampling_is_the_configs():
    """Every `SamplingConfig` setting reaches the LLM by name: as a keyword, an attribute and a request kwarg."""
    cfg = SamplingConfig(temperature=0.3, top_k=7)
    llm = lr.LLM.for_rollout("http://h:1", "rid", sampling=cfg, max_tokens=9)
    assert llm.sampling == SamplingConfig(temperature=0.3, top_k=7, max_tokens=9) and cfg.max_tokens == 256
    assert {name: getattr(llm, name) for name in SamplingConfig.model_fields} == llm.sampling.model_dump()
    assert llm.sampling_kwargs() == {
        "temperature": 0.3,
        "top_p": 1.0,
        "max_tokens": 9,
        "extra_body": {"top_k": 7},
    }
    copy = pickle.loads(pickle.dumps(llm))
    assert copy == llm and hash(copy) == hash(llm) and copy.top_k == 7
    for bad in ({"temprature": 0.5}, {"temperature": 5.0}):
        with pytest.raises(ValueError):
            lr.LLM(base_url=BASE, **bad)
    with pytest.raises(AttributeError):
        _ = llm.no_such_setting


def test_rollout_urls_are_built_parsed_and_served_alike():
    url = rollout_url("http://127.0.0.1:9/", "r-1_x", "checker")
    assert url == "http://127.0.0.1:9/rollout/r-1_x/agent/checker/v1"
    assert parse_rollout_url(url + "/") == ("http://127.0.0.1:9", "r-1_x", "checker")
    assert parse_rollout_url(rollout_url("http://h/base", "r")) == ("http://h/base", "r", None)
    assert parse_rollout_url("https://api.example.com/v1") is None
    # The gateway serves exactly these paths.
    served = [p.format(rollout_id="r-1_x", role="checker") + "/v1" for p in ROUTE_PREFIXES]
    assert [f"http://127.0.0.1:9{p}" for p in served] == [rollout_url("http://127.0.0.1:9", "r-1_x"), url]
    for bad in ["", "a/b", "a.b", "x" * 129]:
        with pytest.raises(ValueError, match="invalid rollout id"):
            rollout_url("http://h", bad)
    assert check_role("a.b-c_1") == "a.b-c_1"
    with pytest.raises(ValueError, match="invalid agent role"):
        check_role(".hidden")


# ---- @rollout, LitAgent, load_agent, call_agent ----------------------------------------------------------


@lr.rollout
async def async_agent(task: dict, llm: lr.LLM) -> float:
    await asyncio.sleep(0)
    return float(task["x"]) * 2


@lr.rollout(name="syncy")
def sync_agent(task, llm):
    return task["x"] + 1


def plain_agent(task, llm):
    return 0.5


class CounterAgent(lr.LitAgent):
    name = "counter"

    def __init__(self):
        self.events = []

    async def setup(self):
        self.events.append("setup")

    def rollout(self, task, llm):
        self.events.append(("rollout", task["x"], threading.current_thread() is threading.main_thread()))
        return 1.0

    def teardown(self):
        self.events.append("teardown")


def test_rollout_decorator_keeps_the_function():
    assert asyncio.iscoroutinefunction(async_agent)
    assert asyncio.run(async_agent({"x": 2}, lr.LLM(base_url=BASE))) == 4.0
    assert sync_agent({"x": 1}, None) == 2
    assert pickle.loads(pickle.dumps(sync_agent)) is sync_agent
    with pytest.raises(TypeError, match=r"\(task, llm\)"):

        @lr.rollout
        def one_arg(task):
            return 1.0


def test_load_agent_by_spec_object_and_class():
    a = load_agent(f"{__name__}:async_agent")
    assert a.name == "async_agent" and a.setup is None and a.rollout is async_agent
    assert load_agent(sync_agent).name == "syncy"
    assert load_agent(plain_agent).name == "plain_agent"
    c = load_agent(f"{__name__}:CounterAgent")
    assert c.name == "counter" and isinstance(c.instance, CounterAgent)
    for spec, match in [
        (__name__, "module:function"),
        ("tests.unit.no_such_module:x", "cannot import module"),
        (f"{__name__}:nope", "no attribute"),
        (f"{__name__}:BASE", "expected a function"),
        (f"{__name__}:EmittedReward", "does not subclass"),
    ]:
        with pytest.raises(AgentLoadError, match=match):
            load_agent(spec)

    class NoRollout(lr.LitAgent):
        pass

    with pytest.raises(AgentLoadError, match="cannot instantiate"):
        load_agent(NoRollout)


def test_call_agent_runs_sync_code_in_the_executor_and_awaits_async():
    async def main():
        agent = load_agent(CounterAgent)
        with ThreadPoolExecutor(2) as pool:
            await call_agent(agent.setup, executor=pool)
            out = [await call_agent(agent.rollout, {"x": i}, None, executor=pool) for i in range(2)]
            await call_agent(agent.teardown, executor=pool)
        return agent, out, await call_agent(async_agent, {"x": 3}, None)

    agent, out, doubled = asyncio.run(main())
    assert out == [1.0, 1.0] and doubled == 6.0
    # Sync rollout code never ran on the event loop's (main) thread.
    assert agent.instance.events == ["setup", ("rollout", 0, False), ("rollout", 1, False), "teardown"]


# ---- rewards ---------------------------------------------------------------------------------------------


def test_emit_reward_outside_a_rollout_raises():
    with pytest.raises(RuntimeError, match="outside a rollout"):
        lr.emit_reward(1.0)


def test_emit_reward_validates_values():
    with open_reward_sink("r") as sink:
        for bad in [float("nan"), float("inf"), "1", None]:
            with pytest.raises((TypeError, ValueError)):
                lr.emit_reward(bad)
        with pytest.raises(ValueError, match="'acc'"):
            lr.emit_reward(1.0, acc=float("nan"))
        lr.emit_reward(1, acc=True)
    assert sink.rewards == [EmittedReward(1.0, {"acc": 1.0}, sink.rewards[0].time, None)]


def test_rewards_carry_time_dims_and_the_latest_call_index():
    calls = {"n": None}
    with open_reward_sink("rid", latest_call_index=lambda: calls["n"]) as sink:
        lr.emit_reward(0.1, fmt=1.0)
        calls["n"] = 0
        lr.emit_reward(0.2)
        calls["n"] = 3
        lr.emit_reward(0.7, correct=1.0, style=0.4)
    got = [(r.value, r.dims, r.call_index) for r in sink.rewards]
    assert got == [(0.1, {"fmt": 1.0}, None), (0.2, {}, 0), (0.7, {"correct": 1.0, "style": 0.4}, 3)]
    assert all(r.time > 0 for r in sink.rewards) and sink.closed


def test_a_failing_call_index_does_not_fail_the_agent():
    with open_reward_sink("rid", latest_call_index=lambda: 1 // 0) as sink:
        lr.emit_reward(1.0)
    assert [(r.value, r.call_index) for r in sink.rewards] == [(1.0, None)]


@lr.rollout
async def busy_agent(task: dict, llm: lr.LLM) -> None:
    """Emits from every place an agent can run code, each reward tagged by where it came from."""
    tag = task["tag"]
    shared_pool: ThreadPoolExecutor = task["pool"]

    async def subtask():
        await asyncio.sleep(0.01)
        lr.emit_reward(1.0, src=1)

    def in_thread(dim: int):
        lr.emit_reward(1.0, src=dim)

    def nested():
        inner = threading.Thread(target=in_thread, args=(5,))
        inner.start()
        inner.join()

    await asyncio.gather(subtask(), asyncio.create_task(subtask()))
    await asyncio.to_thread(in_thread, 2)
    shared_pool.submit(in_thread, 3).result()
    await asyncio.get_running_loop().run_in_executor(shared_pool, in_thread, 3)
    with ThreadPoolExecutor(2) as own_pool:
        list(own_pool.map(in_thread, [4, 4]))
    t = threading.Thread(target=in_thread, args=(6,))
    t.start()
    t.join()
    n = threading.Thread(target=nested)
    n.start()
    n.join()
    assert current_reward_sink().rollout_id == tag


EXPECTED_SOURCES = [1, 1, 2, 3, 3, 4, 4, 5, 6]


def test_emit_reward_reaches_the_right_rollout_from_tasks_and_threads():
    """Many concurrent rollouts share one event loop and one thread pool (one thread, so the same thread
    serves every rollout): each reward must land in its own rollout's sink."""

    async def run_one(tag: str, pool: ThreadPoolExecutor):
        with open_reward_sink(tag) as sink:
            await busy_agent({"tag": tag, "pool": pool}, None)
        return sink

    async def main():
        with ThreadPoolExecutor(1) as pool:
            return await asyncio.gather(*(run_one(f"r{i}", pool) for i in range(6)))

    sinks = asyncio.run(main())
    for sink in sinks:
        assert sorted(r.dims["src"] for r in sink.rewards) == EXPECTED_SOURCES, sink.rollout_id
        assert sink.late == 0


def test_sync_agent_threads_via_call_agent_and_a_reused_pool_thread():
    """A sync agent run by `call_agent` in the runner's pool; the pool thread it used must not keep
    pointing at that rollout afterwards."""

    def sync_emitter(task, llm):
        lr.emit_reward(task["v"])
        t = threading.Thread(target=lr.emit_reward, args=(task["v"] * 10,))
        t.start()
        t.join()

    async def main(pool):
        async def one(v):
            with open_reward_sink(str(v)) as sink:
                await call_agent(sync_emitter, {"v": v}, None, executor=pool)
            return sink

        return await asyncio.gather(*(one(v) for v in (1, 2, 3)))

    with ThreadPoolExecutor(1) as pool:
        sinks = asyncio.run(main(pool))
        assert [sorted(r.value for r in s.rewards) for s in sinks] == [[1, 10], [2, 20], [3, 30]]
        with pytest.raises(RuntimeError, match="outside a rollout"):
            pool.submit(lr.emit_reward, 1.0).result()


def test_late_emit_from_a_leftover_thread_is_dropped_with_a_warning():
    release = threading.Event()
    errors = []

    def straggler():
        release.wait(5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                lr.emit_reward(9.0)
            except Exception as e:  # must not raise
                errors.append(e)
        errors.extend(str(w.message) for w in caught if "after rollout" not in str(w.message))
        if not caught:
            errors.append("no warning")

    with open_reward_sink("gone") as sink:
        t = threading.Thread(target=straggler)
        t.start()
    release.set()
    t.join()
    assert errors == [] and sink.rewards == [] and sink.late == 1


def test_reward_resolution():
    e = [EmittedReward(0.25), EmittedReward(0.5)]
    assert rollout_reward(1.0, e) == 1.0
    assert rollout_reward(None, e) == 0.75
    assert rollout_reward(None, []) is None
    assert coerce_reward(None) is None and coerce_reward(True) == 1.0 and coerce_reward(3) == 3.0
    with pytest.raises(TypeError):
        coerce_reward("1.0")
    with pytest.raises(ValueError):
        coerce_reward(float("nan"))


def test_importing_lightning_ray_is_light():
    """Agent modules import only `lightning_ray`; that must not drag in Ray, torch or openai."""
    code = (
        "import sys, lightning_ray as lr; "
        "heavy = [m for m in ('ray', 'torch', 'vllm', 'openai', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "assert all(callable(getattr(lr, n)) for n in ('rollout', 'LitAgent', 'LLM', 'emit_reward', 'ToolError'))"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2])
    )
