"""The run page in a real browser (Debian's headless Chromium, driven by Playwright) against a small finished run:
tests/data/view_run/, made by a real `lightning-ray train` (`python -m tests.make_view_run`). The run's config
points at a tiny model that no longer exists, so the copy here points at this session's tiny model, which has the
same tokenizer."""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from lightning_ray.view.app import start_view

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "view_run"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir) -> Path:
    run = tmp_path / "view_run"
    shutil.copytree(FIXTURE, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["path"] = str(tiny_model_dir)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run


def received_texts(run: Path, rollout_id: str) -> list[str]:
    """What the agent logged it received from each LLM call (`demo_agent` logs `received <json>`)."""
    for path in sorted((run / "trajectories").glob("step-*-rollouts.parquet")):
        for row in pq.read_table(path).to_pylist():
            if row["rollout_id"] == rollout_id:
                return [json.loads(m) for m in re.findall(r"received (\".*\")$", row["logs"], re.MULTILINE)]
    raise AssertionError(f"no rollout {rollout_id}")


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium package is not installed (./install.sh installs it)"
)
def test_the_run_page_in_chromium(run_dir):
    from playwright.sync_api import expect, sync_playwright

    page_server = start_view(run_dir)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(page_server.url)
            expect(page.locator("body[data-ready='1']")).to_have_count(1, timeout=30_000)

            # the curves are drawn: Plotly put a line trace with one point per logged step
            steps = len((run_dir / "metrics.jsonl").read_text().splitlines()) - 1  # row 0: validation only
            reward = page.locator("#chart-reward .scatterlayer .trace").first
            expect(reward.locator(".point")).to_have_count(steps)
            assert page.locator("#chart-step_time .barlayer .trace").count() == 3
            expect(page.locator("#status")).to_contain_text("run completed after 3 steps")
            expect(page.locator("#failures")).to_contain_text("tool_error")

            # a two-call rollout opens, and each call shows exactly the text its agent received
            row = page.locator("#rollout-table tr[data-calls='2']").first
            rollout_id = row.get_attribute("data-rollout")
            row.click()
            detail = page.locator(f"#rollout-detail[data-rollout='{rollout_id}']")
            expect(detail).to_have_count(1)
            shown = [r.text_content() for r in detail.locator("pre.response").all()]
            assert shown == received_texts(run_dir, rollout_id) and len(shown) == 2
            # the second call's prompt carries the tool result: the length of the first answer
            expect(detail.locator(".turn.tool pre").first).to_have_text(str(len(shown[0])))
            assert detail.locator(".tokens span").count() > 0  # per-token log-probs, decoded by the tokenizer
            expect(detail.locator("pre.logs")).to_contain_text("received")

            # its group side by side, with the advantages the run's algorithm gives
            detail.locator("a[data-open*='fragments/group/']").click()
            expect(page.locator("#group-detail .sample")).to_have_count(4)
            assert "advantage" in page.locator("#group-detail").inner_text()

            # a filter narrows the list
            page.select_option("select[name=failure]", "tool_error")
            page.click("#filters button")
            expect(page.locator("#rollouts .muted")).to_contain_text("rollouts · page 1")
            kinds = page.locator("#rollout-table tr[data-open] td.bad").all_text_contents()
            assert kinds and set(kinds) == {"tool_error"}
            browser.close()
    finally:
        page_server.stop()


def test_a_page_bound_with_a_token_refuses_requests_without_it(run_dir):
    page_server = start_view(run_dir, token="s3cret")
    try:
        base = page_server.url.split("?")[0]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "api/charts")
        assert refused.value.code == 401
        assert urllib.request.urlopen(page_server.url).status == 200
        request = urllib.request.Request(base + "api/charts", headers={"Authorization": "Bearer s3cret"})
        assert "reward" in json.loads(urllib.request.urlopen(request).read())
    finally:
        page_server.stop()
