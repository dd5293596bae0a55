"""Screenshots of the run page for the README: `python -m benchmarks.view_screenshots RUN_DIR [OUT_DIR]`.

Serves RUN_DIR's page, opens it in Debian's headless Chromium (Playwright), and saves the curves, a rollout with
its calls, and a GRPO group side by side as view_curves.png, view_rollout.png and view_group.png
(default OUT_DIR: benchmarks/results).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from lightning_ray.view.app import start_view


def main(run_dir: str, out: str = "benchmarks/results") -> None:
    from playwright.sync_api import expect, sync_playwright

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    server = start_view(run_dir)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(server.url)
            expect(page.locator("body[data-ready='1']")).to_have_count(1, timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=out_dir / "view_curves.png")
            # the best rollout of a group whose rewards differ (a group that taught something), else the best
            rows = page.locator("#rollout-table tr[data-open]")
            seen = rows.evaluate_all(
                "rs => rs.map(r => [Number(r.dataset.reward), r.cells[0].innerText + '/' + r.cells[1].innerText])"
            )
            spread = {g for _, g in seen if len({r for r, h in seen if h == g}) > 1}
            pick = max(range(len(seen)), key=lambda i: (seen[i][1] in spread, seen[i][0], -i))
            rows.nth(pick).click()
            detail = page.locator("#rollout-detail")
            expect(detail).to_have_count(1, timeout=60_000)
            detail.locator("details").nth(1).evaluate("e => e.open = true")  # its tokens, shaded by log-prob
            detail.scroll_into_view_if_needed()
            page.locator(".browser").screenshot(path=out_dir / "view_rollout.png")
            detail.locator("a[data-open*='fragments/group/']").click()
            group = page.locator("#group-detail")
            expect(group).to_have_count(1, timeout=60_000)
            group.screenshot(path=out_dir / "view_group.png")
            browser.close()
    finally:
        server.stop()
    print(
        f"wrote {', '.join(str(out_dir / n) for n in ('view_curves.png', 'view_rollout.png', 'view_group.png'))}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
