"""Failure classification against real HTTP errors, message templates, batch summaries, the failure stop."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

import lightning_ray as lr
from lightning_ray.monitor import (
    Failure,
    FailureRateExceeded,
    check_failure_rate,
    classify_exception,
    classify_outcome,
    is_tool_exception,
    message_template,
    summarize_batch,
)
from lightning_ray.tasks import Task, TaskPool

OPENAI_CONTEXT_ERROR = {
    "error": {
        "message": "This model's maximum context length is 2048 tokens. However, your messages resulted in 2100.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}
# vLLM's own wording: numeric code, the reason only in the message.
VLLM_CONTEXT_ERROR = {
    "object": "error",
    "message": "This model's maximum context length is 2048 tokens. However, you requested 2300 tokens.",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if "/ctx-openai/" in self.path:
            status, body = 400, OPENAI_CONTEXT_ERROR
        elif "/ctx-vllm/" in self.path:
            status, body = 400, VLLM_CONTEXT_ERROR
        else:
            status, body = 500, {"error": {"message": "engine crashed at step 17", "type": "server_error"}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def gateway_url():
    """A real HTTP server answering like a gateway that hit errors."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _chat(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=10)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])


def _raised(fn, *args) -> BaseException:
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - capturing what an agent would raise
        return e
    raise AssertionError("expected an exception")


def test_gateway_context_length_errors_are_truncated_context(gateway_url):
    for path in ("ctx-openai", "ctx-vllm"):
        exc = _raised(_chat, f"{gateway_url}/rollout/{path}/v1")
        assert isinstance(exc, openai.BadRequestError)
        f = classify_exception(exc)
        assert f.kind == "truncated_context", (path, f)
        assert f.detail["status_code"] == 400 and f.detail["url"].startswith(gateway_url)
        assert f.exc_type == "openai.BadRequestError" and "maximum context length" in f.message


def test_llm_errors_anywhere_in_the_chain(gateway_url):
    server_error = _raised(_chat, f"{gateway_url}/rollout/r1/v1")
    f = classify_exception(server_error)
    assert (f.kind, f.detail["status_code"]) == ("llm_error", 500)

    def agent_wraps():
        try:
            _chat(f"{gateway_url}/rollout/r1/v1")
        except openai.APIError as e:
            raise RuntimeError("step 3 failed") from e

    wrapped = classify_exception(_raised(agent_wraps))
    assert wrapped.kind == "llm_error" and wrapped.exc_type == "openai.InternalServerError"
    assert "RuntimeError: step 3 failed" in wrapped.traceback

    def agent_hides():  # context, not cause, and suppressed: still found
        try:
            _chat(f"{gateway_url}/rollout/r1/v1")
        except openai.APIError:
            raise ValueError("no answer") from None

    assert classify_exception(_raised(agent_hides)).kind == "llm_error"
    group = ExceptionGroup("tasks failed", [ValueError("x"), server_error])
    assert classify_exception(group).kind == "llm_error"

    with __import__("socket").socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/rollout/r/v1"
    refused = classify_exception(_raised(_chat, closed))
    assert refused.kind == "llm_error" and refused.exc_type == "openai.APIConnectionError"


def test_raw_httpx_errors_count_as_llm_only_for_the_gateway(gateway_url):
    def post(url):
        httpx.post(url, json={}).raise_for_status()

    base = f"{gateway_url}/rollout/r2/v1"
    exc = _raised(post, f"{base}/chat/completions")
    f = classify_exception(exc, llm_base_url=base)
    assert (f.kind, f.detail["status_code"]) == ("llm_error", 500)
    # The same error from a URL that is not the gateway's is the agent's (or its tool's) business.
    assert classify_exception(exc, llm_base_url="http://127.0.0.1:1/rollout/r2/v1").kind == "agent_exception"
    assert classify_exception(exc).kind == "agent_exception"


def test_timeouts():
    async def slow():
        await asyncio.wait_for(asyncio.sleep(5), 0.01)

    assert classify_exception(_raised(asyncio.run, slow())).kind == "timeout"
    f = classify_outcome(timed_out=True, timeout_s=30.0)
    assert (f.kind, f.detail, f.message) == (
        "timeout",
        {"timeout_s": 30.0},
        "rollout did not finish within 30s",
    )
    assert f.status == "timed_out" and classify_exception(KeyError("x")).status == "failed"


class CalculatorToolError(Exception):
    pass


class ToolboxError(Exception):
    pass


class StoolError(Exception):
    pass


class DivByZeroInTool(lr.ToolError):
    pass


def test_tool_error_rule(tmp_path, monkeypatch):
    (tmp_path / "my_agent").mkdir()
    (tmp_path / "my_agent" / "__init__.py").write_text("")
    (tmp_path / "my_agent" / "tools.py").write_text("class EvalFailed(Exception):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_agent.tools import EvalFailed  # a module component named 'tools'

    for exc in [lr.ToolError("x"), DivByZeroInTool("x"), CalculatorToolError("x"), EvalFailed("x")]:
        assert is_tool_exception(exc), exc
        assert classify_exception(exc).kind == "tool_error"
    for exc in [ToolboxError("x"), StoolError("x"), ValueError("tool failed")]:
        assert not is_tool_exception(exc), exc
        assert classify_exception(exc).kind == "agent_exception"

    def wrapped():
        try:
            raise EvalFailed("bad expression '1/0'")
        except EvalFailed as e:
            raise RuntimeError("agent gave up") from e

    f = classify_exception(_raised(wrapped))
    assert f.kind == "tool_error" and f.exc_type == "my_agent.tools.EvalFailed"


def test_agent_exception_keeps_type_message_traceback():
    def parse_answer(text):
        return {"a": 1}[text]

    f = classify_exception(_raised(parse_answer, "b"))
    assert (f.kind, f.exc_type, f.message) == ("agent_exception", "KeyError", "'b'")
    assert "parse_answer" in f.traceback and f.traceback.rstrip().endswith("KeyError: 'b'")
    assert Failure.from_dict(f.to_dict()) == f


def test_outcomes_without_an_exception():
    assert classify_outcome(reward=0.0) is None
    assert (
        classify_outcome(reward=1.0, last_finish_reason="length") is None
    )  # cut off but rewarded: trained on
    assert classify_outcome(reward=None).kind == "no_reward"
    assert classify_outcome(reward=None, last_finish_reason="length").kind == "truncated_context"
    assert classify_outcome(exception=KeyError("x"), reward=1.0).kind == "agent_exception"


def test_message_templates():
    assert message_template("KeyError: 'answer' missing in row 42") == "KeyError: <str> missing in row <num>"
    assert message_template("object at 0x7f3a2b1c") == "object at <hex>"
    assert message_template("rollout Xk3_aZ9pQwErTy12Ab-c took 3.5s") == "rollout <id> took <num>s"
    assert message_template('can\'t parse "1+" (pos 3)') == "can't parse <str> (pos <num>)"
    assert message_template("req 123e4567-e89b-12d3-a456-426614174000") == "req <uuid>"
    assert message_template("model v2 failed") == "model v2 failed"
    assert message_template("x" * 500) == "x" * 300


def _failed(rid: str, exc: BaseException) -> dict:
    f = classify_exception(exc)
    return {"rollout_id": rid, "status": "failed", "kind": f.kind, "reward": None, "failure": f.to_dict()}


def _raise_key(name):
    return {}[name]


def test_summary_groups_recurring_patterns():
    records = [
        {"rollout_id": f"ok{i}", "status": "succeeded", "reward": r}
        for i, r in enumerate([0.0, 1.0, 1.0, 0.0])
    ]
    records += [_failed(f"k{i}", _raised(_raise_key, f"field_{chr(97 + i)}")) for i in range(3)]
    records += [_failed("t", lr.ToolError("calculator: bad expression '2**99999'"))]
    records += [
        {"rollout_id": "slow", "status": "timed_out", "kind": "timeout", "reward": None, "failure": None}
    ]
    records += [
        {"rollout_id": "lost", "status": "abandoned", "reward": None, "failure": {"reason": "lease expired"}}
    ]
    s = summarize_batch(records)
    assert (s.num_rollouts, s.num_succeeded, s.success_rate) == (10, 4, 0.4)
    assert s.reward_mean == 0.5 and s.reward_std == 0.5 and s.num_rewarded == 4
    assert s.failures_by_kind == {"agent_exception": 3, "tool_error": 1, "timeout": 1, "abandoned": 1}
    assert s.by_status == {"succeeded": 4, "failed": 4, "timed_out": 1, "abandoned": 1}
    top = s.patterns[0]
    assert (top.kind, top.exc_type, top.template, top.count) == ("agent_exception", "KeyError", "<str>", 3)
    assert "_raise_key" in top.example_traceback and top.example_rollout_id == "k0"
    assert sum(p.count for p in s.patterns) == 6
    assert json.loads(json.dumps(s.to_dict()))["failures_by_kind"]["tool_error"] == 1


def test_failure_rate_threshold_stops_with_a_diagnosis():
    records = [{"rollout_id": "ok", "status": "succeeded", "reward": 1.0}]
    records += [_failed(f"k{i}", _raised(_raise_key, f"q{i}")) for i in range(3)]
    s = summarize_batch(records)
    check_failure_rate(s, 0.75)  # exactly at the threshold: allowed
    with pytest.raises(FailureRateExceeded) as info:
        check_failure_rate(s, 0.5)
    text = str(info.value)
    assert "75.0%" in text and "rollout.max_failure_rate=50.0%" in text
    assert "[agent_exception] 3x KeyError: <str>" in text and "_raise_key" in text
    check_failure_rate(summarize_batch([]), 0.0)


def test_summary_of_real_pool_results():
    """The pool's records feed the summary directly."""
    pool = TaskPool([Task("t0", {"q": 0}), Task("t1", {"q": 1})], group_size=2, max_attempts=1, shuffle=False)
    batch = pool.start_batch(2)
    leases = pool.lease("w", 4)
    pool.complete(leases[0].rollout_id, 1, "succeeded", reward=1.0)
    pool.complete(leases[1].rollout_id, 1, "succeeded", reward=0.0)
    f = classify_exception(_raised(_raise_key, "x"))
    pool.complete(leases[2].rollout_id, 1, "failed", kind=f.kind, failure=f.to_dict())
    pool.expire_leases(now=float("inf"))  # the last lease is never reported
    s = summarize_batch(pool.batch_results(batch))
    assert s.by_status == {"succeeded": 2, "failed": 1, "abandoned": 1}
    assert s.failures_by_kind == {"agent_exception": 1, "abandoned": 1} and s.reward_mean == 0.5


def test_step_line_reports_the_weight_sync():
    from lightning_ray.monitor.run_log import step_line

    metrics = {"rollout/reward_mean": 0.5, "time/broadcast_s": 0.612, "sync/version": 3}
    line = step_line(3, 20, metrics)
    assert line.startswith("step 3/20 | reward 0.500 |") and line.endswith("sync v3 0.61s")
    del metrics["sync/version"]
    assert step_line(3, 20, metrics).endswith("sync 0.61s")  # a loop that does not report the version
    assert step_line(1, 2, {}).endswith("sync -s")


def test_step_line_says_the_staleness_and_the_stale_share():
    from lightning_ray.monitor.run_log import step_line
    from lightning_ray.monitor.staleness import stale_share

    ended = {"trained": 24, "dropped/stale": 8, "dropped/zero_variance": 8}
    assert stale_share(ended) == {"staleness/dropped_share": 0.2}
    assert stale_share({}) == {} and stale_share({"trained": 8}) == {"staleness/dropped_share": 0.0}
    metrics = {"staleness/max": 1, "staleness/tokens_behind_0": 0.75, **stale_share(ended)}
    assert step_line(3, 20, metrics).endswith("| lag<=1 25% drop 20%")
    every_token_behind = {"staleness/max": 1, "staleness/tokens_behind_1": 1.0}  # no empty bucket for 0
    assert step_line(3, 20, every_token_behind).endswith("| lag<=1 100%")
    assert step_line(3, 20, {"staleness/dropped_share": 0.5}).endswith("| drop 50%")
    assert step_line(3, 20, {"staleness/max": 0, "staleness/dropped_share": 0.0}).endswith("s")
