"""A live client in a process of its own, as a real user of `lightning-ray serve --learn` would be: the plain
`openai` SDK for the calls and plain HTTP for opening rollouts and posting rewards (no lightning_ray import).

    python tests/live_client.py URL OUT.json DEADLINE_S N

1. opens a rollout, calls it once and lets `DEADLINE_S` pass: its reward is then refused (409);
2. opens N rollouts, calls each once and rewards them later, 1.0 and 0.0 alternately;
3. tries a second reward, an unknown rollout and a malformed body.
Every answer's status and body go to OUT.json.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

from openai import OpenAI


def post(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body if body is not None else {}).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def ask(url: str, question: str) -> tuple[str, str]:
    """Open a rollout and make one call in it; returns (rollout_id, answer)."""
    _, opened = post(f"{url}/rollouts")
    llm = OpenAI(base_url=opened["base_url"], api_key="EMPTY")
    reply = llm.chat.completions.create(
        model="policy", messages=[{"role": "user", "content": question}], max_tokens=8
    )
    return opened["rollout_id"], reply.choices[0].message.content or ""


def main(url: str, out: str, deadline_s: float, n: int) -> None:
    results: dict = {}
    late, _ = ask(url, "What is 9 + 9?")
    time.sleep(deadline_s + 1.5)
    results["late"] = {"rollout_id": late, "answer": post(f"{url}/rollouts/{late}/reward", {"value": 1.0})}
    asked = [ask(url, f"What is {i} + {i}?")[0] for i in range(n)]
    time.sleep(0.5)  # rewards come later than the answers
    results["rewarded"] = [
        {"rollout_id": rid, "answer": post(f"{url}/rollouts/{rid}/reward", {"value": float(i % 2 == 0)})}
        for i, rid in enumerate(asked)
    ]
    results["again"] = post(f"{url}/rollouts/{asked[0]}/reward", {"value": 1.0})
    results["unknown"] = post(f"{url}/rollouts/no-such-rollout/reward", {"value": 1.0})
    results["malformed"] = post(f"{url}/rollouts/{late}/reward", {"reward": 1.0})
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
