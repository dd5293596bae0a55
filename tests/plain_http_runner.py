"""A remote runner written against the plain HTTP task API: no lightning_ray import, only `urllib` and `openai`,
to show that an agent in any language can join a train run.

    python plain_http_runner.py URL TOKEN   -> prints the JSON answer of its `complete`
"""

import json
import sys
import urllib.request

import openai


def post(url: str, token: str, body: dict | None = None) -> dict:
    data = json.dumps(body if body is not None else {}).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as response:
        return json.loads(response.read())


def main(url: str, token: str) -> None:
    runner = post(f"{url}/runners", token, {"name": "plain"})
    leases = []
    while not leases:
        leases = post(f"{url}/runners/{runner['runner_id']}/lease", token, {"max_n": 1, "wait_s": 5})[
            "leases"
        ]
    lease = leases[0]
    task_url = f"{url}/tasks/{lease['lease_id']}"
    client = openai.OpenAI(base_url=lease["base_url"], api_key=token, max_retries=0)
    reply = client.chat.completions.create(
        model=runner["model"],
        messages=[{"role": "user", "content": lease["task"]["question"]}],
        max_tokens=runner["sampling"]["max_tokens"],
    )
    assert post(f"{task_url}/heartbeat", token)["held"]
    post(f"{task_url}/reward", token, {"value": 0.5, "dims": {"format": 1.0}})
    answer = post(
        f"{task_url}/complete", token, {"reward": float(len(reply.choices[0].message.content or "") % 2)}
    )
    print(json.dumps({"runner_id": runner["runner_id"], "rollout_id": lease["rollout_id"], **answer}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
