"""The cluster you can see: /admin/status, per-rank /metrics, `status`, `top` under a pty, and the
dashboard and playground in a real headless Chromium, on one two-rank cluster with an API key.

The browser tests need Debian's `chromium` and `chromium-driver` (.ci/install-system-deps.sh) and
selenium (the `test` extra); without them they skip. With MLX_CLUSTER_SCREENSHOTS=DIR set they
save the screenshots the docs show (docs/images/).
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster import REPO, Cluster

pytestmark = pytest.mark.slow

KEY = "sk-dashboard-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models_dir):
    c = Cluster(
        tmp_path_factory.mktemp("dashboard"),
        ranks=2,
        models_dir=models_dir,
        config={"scheduler": {"max_batch_size": 8}},
        env={"MLX_CLUSTER_API_KEY": KEY},
    )
    with c:
        yield c


def status(cluster) -> dict:
    r = httpx.get(cluster.url + "/admin/status", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def complete(cluster, tokens: int = 24) -> None:
    body = {"model": "builtin:tiny", "prompt": "hello there", "max_tokens": tokens, "temperature": 0}
    r = httpx.post(cluster.url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text


def test_admin_status_and_metrics_carry_every_rank(cluster):
    assert httpx.get(cluster.url + "/admin/status", timeout=10).status_code == 401
    wait_for(lambda: all(r["up"] for r in status(cluster)["ranks"]), 30, "both ranks to report")
    complete(cluster)
    s = wait_for(lambda: (s := status(cluster))["ranks"][1].get("gen_tokens", 0) >= 24 and s, 30, "rank 1's tokens")
    assert s["cluster"]["world_size"] == 2 and s["cluster"]["backend"] == "ring"
    pids = cluster.rank_pids()
    assert [r["pid"] for r in s["ranks"]] == pids
    for r in s["ranks"]:
        assert r["mem_active"] > 0 and r["mem_peak"] >= r["mem_active"] and r["bus"]["device_syncs"] == 0
        assert "ram" in r["cache"]  # the prefix cache's stats, passed through
    text = httpx.get(cluster.url + "/metrics", headers=AUTH, timeout=10).text
    for rank in ("0", "1"):
        assert re.search(rf'mlx_cluster_rank_up\{{model_name="builtin:tiny",rank="{rank}"\}} 1.0', text)
        assert f'mlx_cluster_engine_step_seconds{{model_name="builtin:tiny",rank="{rank}"}}' in text
        assert re.search(
            rf'mlx_cluster_rank_phase_seconds_total\{{model_name="builtin:tiny",phase="model",rank="{rank}"\}}', text
        )


def test_status_command_shows_every_rank(cluster):
    out = subprocess.run(
        [sys.executable, "-m", "mlx_cluster", "status", str(cluster.config_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=cluster.env,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.split()[:1] == ["rank"])
    assert "memory" in header and "step" in header and "tok/s" in header
    rows = [line.split() for line in lines if line.split()[:1] in (["0"], ["1"])]
    assert [row[0] for row in rows] == ["0", "1"] and all(row[3] == "up" for row in rows), out.stdout
    assert [int(row[2]) for row in rows] == cluster.rank_pids()


def read_pty(fd: int, until, timeout_s: float) -> str:
    """What the program drew, as text (escape sequences removed), once `until(text)` holds."""
    raw = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                raw += os.read(fd, 65536)
            except OSError:
                break
            text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]", "", raw.decode(errors="replace"))
            if until(text):
                return text
    raise AssertionError(f"the screen never showed what was expected:\n{raw.decode(errors='replace')[-3000:]}")


def test_top_draws_every_rank_under_a_pseudo_terminal(cluster):
    main, child = os.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_cluster", "top", str(cluster.config_path), "--interval", "0.5"],
        stdin=child,
        stdout=child,
        stderr=child,
        cwd=REPO,
        env={**cluster.env, "TERM": "xterm-256color"},
        start_new_session=True,
    )
    os.close(child)
    try:
        pids = [str(p) for p in cluster.rank_pids()]
        drawn = ("mlx-cluster top", "tok/s", "requests")  # a whole frame: a read can end mid-draw
        screen = read_pty(
            main,
            lambda t: (
                "ranks" in t and all(p in t for p in pids) and t.count("up (") >= 2 and all(w in t for w in drawn)
            ),
            60,
        )
        assert all(w in screen for w in drawn)
        os.write(main, b"q")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)


# ---- the browser ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/install-system-deps.sh)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, name: str) -> None:
    folder = os.environ.get("MLX_CLUSTER_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


def wait_js(driver, script: str, timeout_s: float, what: str):
    return wait_for(lambda: driver.execute_script(script), timeout_s, what)


def rank_states(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#ranks tbody tr')].map(r => r.dataset.state)")


def test_dashboard_asks_for_the_key_then_shows_both_ranks_and_charts(cluster, browser):
    browser.get(cluster.url + "/")
    wait_js(browser, "return !document.querySelector('#key-prompt').hidden", 20, "the API key prompt")
    assert KEY not in browser.current_url
    browser.find_element("id", "key-input").send_keys(KEY)
    browser.find_element("css selector", "#key-form button").click()
    wait_for(lambda: rank_states(browser) == ["up", "up"], 30, "both ranks up on the page")
    assert browser.execute_script("return sessionStorage.getItem('mlx-cluster-api-key')") == KEY
    for _ in range(4):
        complete(cluster, tokens=40)
        time.sleep(0.5)
    wait_js(browser, "return Number(document.querySelector('#chart-throughput').dataset.points) > 0", 30, "chart data")
    wait_js(
        browser,
        "return [...document.querySelectorAll('#chart-throughput path.line')].some(p => p.getAttribute('d').length > 0)",
        10,
        "a drawn throughput line",
    )
    screenshot(browser, "dashboard.png")


def test_playground_streams_a_reply(cluster, browser):
    browser.find_element("id", "tab-playground").click()
    wait_js(browser, "return document.querySelector('#pg-model').options.length > 0", 20, "the model list")
    browser.find_element("id", "pg-max-tokens").clear()
    browser.find_element("id", "pg-max-tokens").send_keys("24")
    browser.find_element("id", "pg-input").send_keys("Hello, cluster!")
    browser.find_element("id", "pg-send").click()
    meta = wait_js(
        browser,
        "const m = document.querySelector('.msg.assistant[data-done]'); return m && m.querySelector('.meta').textContent",
        60,
        "the streamed reply",
    )
    assert "generated tokens" in meta and "TTFT" in meta, meta
    assert browser.execute_script("return document.querySelector('.msg.assistant .text').textContent.length") > 0
    screenshot(browser, "playground.png")
    browser.find_element("id", "tab-dashboard").click()


def test_a_killed_rank_shows_as_down_and_then_back(cluster, browser):
    browser.find_element("id", "tab-dashboard").click()
    wait_for(lambda: rank_states(browser) == ["up", "up"], 30, "both ranks up")
    restarts = cluster.restarts()
    os.kill(cluster.rank_pids()[1], signal.SIGKILL)
    # Rank 0 sees the status link close at once, then the group fails and restarts: the page shows
    # rank 1 down (or, while rank 0 restarts too, the whole cluster unreachable).
    wait_for(lambda: rank_states(browser)[1:] in (["down"], ["unknown"], ["unreachable"]), 30, "rank 1 to show down")
    cluster.wait_for(lambda: cluster.restarts() > restarts, 60, "the restart")
    cluster.wait_ready(120)
    wait_for(lambda: rank_states(browser) == ["up", "up"], 60, "both ranks back up on the page")
