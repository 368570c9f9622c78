"""`fleet serve` end to end: two real agents behind real mosquitto and moto S3 serve v1, swap to
v2 under load and reject a broken v3; `fleet collect` stores it all, and `fleet serve` (a process on
a free loopback port) shows it: the JSON API, the pages in Debian's headless Chromium (driven by
selenium through /usr/bin/chromedriver; nothing downloads a browser), and the token-guarded rollback.

One fill of the fleet is shared by the module's tests (it takes most of a minute); the rollback
test changes the fleet and runs last."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloud.fleetdb import FleetDB
from cloud.rolloutdb import HALTED, Rollout, RolloutDB
from scripts.loopback.services import Mosquitto, MotoS3, bin_path, free_port
from tests.conftest import Fleet, mlp, run, wait_for
from tests.test_end_to_end import start_load, stop_load

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "dashboard-test-token-0123456789"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTEFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"


@dataclass
class Filled:
    fleet: Fleet
    url: str
    agents: dict[str, Path]  # device id -> agent config
    v3_reason: str


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def post(url: str, body: dict[str, Any], token: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def start_serve(fleet: Fleet, config: Path, *args: str) -> str:
    port = free_port()
    fleet.spawn(
        [bin_path("fleet"), "--config", str(config), "serve", "--listen", f"127.0.0.1:{port}", *args],
        fleet.root / f"serve-{port}.log",
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            get(f"{url}/api/devices")
            return True
        except OSError:
            return False

    wait_for(answers, 30, f"fleet serve on port {port}")
    return url


HALT_REASON = "canary go2-01 rejected: validate: finite: NaN; canaries told to roll back to v2"


def add_halted_rollout(db_file: Path, channel: str) -> None:
    """A staged rollout as the collector's driver leaves one that halted (test_fleet_rollouts drives
    them end to end): the dashboard shows its state and why."""
    db = FleetDB(db_file)
    try:
        row = Rollout(f"{channel}-v4", channel, "v4", "4" * 64, "v2", ("go2-01",), 600.0, "/keys/sign.pem", HALTED,
                      HALT_REASON, time.time() - 60, None, time.time() - 30)  # fmt: skip
        RolloutDB(db).add(row)
    finally:
        db.close()


def device(filled: Filled, device_id: str) -> dict[str, Any]:
    (row,) = [d for d in get(f"{filled.url}/api/devices") if d["device_id"] == device_id]
    return row


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto, s3: MotoS3) -> Iterator[Filled]:
    root = tmp_path_factory.mktemp("dashboard")
    fleet = Fleet(root, broker, s3)
    with fleet.fleet_cfg.open("a") as f:
        f.write(f'[serve]\ntoken = "{TOKEN}"\n')
    try:
        fleet.start_collector()
        wait_for(lambda: (root / "fleet.db").exists(), 20, "the collector's database")
        url = start_serve(fleet, fleet.fleet_cfg)
        agents = {d: fleet.agent_config(d) for d in ("go2-01", "go2-02")}
        for cfg in agents.values():
            fleet.start_agent(cfg)
        models = {v: mlp(root / f"{v}.onnx", seed=i) for i, v in enumerate(("v1", "v2"), 1)}
        models["v3"] = mlp(root / "v3.onnx", seed=3, nan=True)
        fleet.publish(models["v1"], "v1")
        for cfg in agents.values():
            fleet.wait_active(cfg, "v1")
        load, out = start_load(fleet, agents["go2-01"], hz=200)
        f = Filled(fleet, url, agents, "")
        wait_for(lambda: get(f"{url}/api/latency?version=v1")["versions"], 30, "v1's latency at the dashboard")
        fleet.publish(models["v2"], "v2")
        for cfg in agents.values():
            fleet.wait_active(cfg, "v2")
        wait_for(lambda: get(f"{url}/api/latency?version=v2")["versions"], 30, "v2's latency at the dashboard")
        assert stop_load(load, out)["failed"] == 0
        fleet.publish(models["v3"], "v3")
        f.v3_reason = fleet.wait_rejected(agents["go2-01"], "v3")
        fleet.wait_rejected(agents["go2-02"], "v3")
        for d in agents:
            wait_for(lambda d=d: (device(f, d)["last_rejected"] or {}).get("version") == "v3", 30, f"{d}: v3 rejected")
        add_halted_rollout(root / "fleet.db", fleet.channel)
        yield f
    finally:
        fleet.close()


def test_the_api_shows_devices_rollouts_latency_and_events(filled: Filled) -> None:
    url = filled.url
    devices = get(f"{url}/api/devices")
    assert [d["device_id"] for d in devices] == ["go2-01", "go2-02"]
    for d in devices:
        assert d["online"] and d["channel"] == filled.fleet.channel and d["active_version"] == "v2", d
        assert d["last_rejected"]["version"] == "v3" and d["pending"] is None, d
    assert device(filled, "go2-01")["last_rejected"]["reason"] == filled.v3_reason != ""

    (channel,) = get(f"{url}/api/rollouts")
    (staged,) = channel.pop("staged")
    assert channel == {
        "channel": filled.fleet.channel,
        "devices": 2,
        "active": [{"version": "v2", "devices": ["go2-01", "go2-02"]}],
        "pending": [],
        "rejected": [{"version": "v3", "devices": ["go2-01", "go2-02"]}],
    }
    assert (staged["version"], staged["state"], staged["reason"], staged["canaries"]) == (
        "v4",
        HALTED,
        HALT_REASON,
        ["go2-01"],
    )
    assert "sign_key" not in staged  # a path on the publisher's machine

    # The same merged percentiles as `fleet latency` (v1 no longer serves: its figures are final).
    api = get(f"{url}/api/latency?version=v1&device=go2-01&since=1h")
    cli = json.loads(filled.fleet.fleet("latency", "--json", "--version", "v1", "--device", "go2-01").stdout)
    assert api["versions"] == cli["versions"] and api["versions"][0]["calls"] > 0
    assert get(f"{url}/api/latency?device=go2-02")["versions"] == []  # go2-02 served no call
    with pytest.raises(urllib.error.HTTPError) as bad:
        get(f"{url}/api/latency?since=1%20day")
    assert bad.value.code == 400

    events = get(f"{url}/api/events?device=go2-02")
    assert events and {e["device_id"] for e in events} == {"go2-02"}
    assert [e["ts"] for e in events] == sorted((e["ts"] for e in events), reverse=True)  # newest first
    assert any(e.get("version") == "v2" and e.get("state") == "active" for e in events)
    rejected = get(f"{url}/api/events?version=v3")
    assert {e["version"] for e in rejected} == {"v3"} and {e["device_id"] for e in rejected} == {"go2-01", "go2-02"}
    assert any(e.get("state") == "rejected" and e.get("reason") for e in rejected)
    assert len(get(f"{url}/api/events?limit=1")) == 1


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI") == "true":
            pytest.fail("Debian's chromium and chromium-driver are missing (scripts/setup installs them)")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager (which would download one) does not run.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_pages_in_chromium(filled: Filled, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import Select, WebDriverWait

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    browser.get(filled.url + "/")
    row = browser.find_element(By.ID, "device-go2-01")
    assert row.find_element(By.CSS_SELECTOR, ".active-version").text == "v2"
    assert row.find_element(By.CSS_SELECTOR, ".rejected").text == f"v3: {filled.v3_reason}"
    assert "online" in row.text
    assert row.find_elements(By.CSS_SELECTOR, "svg.spark path"), "no sparkline for go2-01"
    rollout = browser.find_element(By.CSS_SELECTOR, f'tr.rollout[data-channel="{filled.fleet.channel}"]')
    assert "v2: go2-01, go2-02" in rollout.text
    staged = browser.find_element(By.CSS_SELECTOR, f'tr.staged[data-rollout="{filled.fleet.channel}-v4"]')
    assert staged.find_element(By.CSS_SELECTOR, ".state").text == HALTED
    assert staged.find_element(By.CSS_SELECTOR, ".reason").text == HALT_REASON
    swaps = [e for e in browser.find_elements(By.CSS_SELECTOR, "tr.event") if e.get_attribute("data-version") == "v2"]
    assert any("active" in e.text for e in swaps), "the swap to v2 is not in the event stream"
    browser.save_screenshot(str(ARTEFACTS / "overview.png"))

    table = browser.find_element(By.ID, "event-table")
    Select(browser.find_element(By.ID, "filter-device")).select_by_value("go2-02")
    browser.find_element(By.ID, "filter-apply").click()
    WebDriverWait(browser, 10).until(staleness_of(table))  # the filtered page replaced this one
    assert "device=go2-02" in browser.current_url
    shown = {e.get_attribute("data-device") for e in browser.find_elements(By.CSS_SELECTOR, "tr.event")}
    assert shown == {"go2-02"}, shown
    browser.save_screenshot(str(ARTEFACTS / "events-go2-02.png"))

    table = browser.find_element(By.ID, "event-table")
    browser.find_element(By.LINK_TEXT, "go2-01").click()
    WebDriverWait(browser, 10).until(staleness_of(table))
    assert browser.current_url.endswith("/devices/go2-01")
    paths = browser.find_elements(By.CSS_SELECTOR, "#latency-chart svg path.series")
    assert {p.get_attribute("data-version") for p in paths} == {"v1", "v2"}
    assert all(p.get_attribute("d").startswith("M") for p in paths)
    assert browser.find_element(By.CSS_SELECTOR, "#device-summary .active-version").text == "v2"
    assert any(e.get_attribute("data-version") == "v3" for e in browser.find_elements(By.CSS_SELECTOR, "tr.event"))
    browser.save_screenshot(str(ARTEFACTS / "device-go2-01.png"))


def test_a_read_only_dashboard_refuses_actions(filled: Filled) -> None:
    config = filled.fleet.root / "fleet-read-only.toml"
    text = filled.fleet.fleet_cfg.read_text()
    config.write_text(text[: text.index("[serve]")])
    url = start_serve(filled.fleet, config)
    status, body = post(f"{url}/api/rollback", {"channel": filled.fleet.channel, "to_version": "v1"}, TOKEN)
    assert status == 403 and "read-only" in body["detail"]


def test_rollback_needs_the_token_and_rolls_the_fleet_back(filled: Filled) -> None:
    """Last in the module: it changes what the fleet runs."""
    url, channel = f"{filled.url}/api/rollback", filled.fleet.channel
    for token in (None, "wrong-token", TOKEN[:-1], TOKEN + "x"):
        status, body = post(url, {"channel": channel, "to_version": "v1"}, token)
        assert status == 401, (token, status, body)
    status, body = post(url, {"channel": channel, "to_version": "v9"}, TOKEN)
    assert status == 400 and "no version 'v9'" in body["detail"]
    assert device(filled, "go2-01")["active_version"] == "v2"  # nothing was announced

    status, body = post(url, {"channel": channel, "to_version": "v1"}, TOKEN)
    assert status == 200 and body["version"] == "v1" and body["channel"] == channel, body
    for d, cfg in filled.agents.items():
        filled.fleet.wait_active(cfg, "v1")
        wait_for(lambda d=d: device(filled, d)["active_version"] == "v1", 30, f"{d} v1 at the dashboard")


def test_serve_binds_to_loopback_unless_allowed(tmp_path: Path) -> None:
    from agent.errors import ConfigError
    from cloud.config import FleetServe
    from cloud.dashboard.listen import check_listen

    assert check_listen(FleetServe().listen, FleetServe().allow_remote) == ("127.0.0.1", 8080)
    assert check_listen("[::1]:9000", False) == ("::1", 9000)
    assert check_listen("0.0.0.0:8080", True) == ("0.0.0.0", 8080)
    for refused in ("0.0.0.0:8080", "192.168.1.10:80", "dashboard.lab:8080"):
        with pytest.raises(ConfigError, match="not loopback"):
            check_listen(refused, False)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        check_listen("8080", False)

    config = tmp_path / "fleet.toml"
    config.write_text('[s3]\nbucket = "b"\n[serve]\nlisten = "0.0.0.0:8080"\n')
    r = run([bin_path("fleet"), "--config", str(config), "serve"], check=False)
    assert r.returncode == 2 and "not loopback" in r.stderr and "allow_remote" in r.stderr, r.stderr
    r = run([bin_path("fleet"), "--config", str(config), "serve", "--listen", "10.0.0.1:80"], check=False)
    assert r.returncode == 2 and "not loopback" in r.stderr, r.stderr


def test_serve_token_settings(tmp_path: Path) -> None:
    from agent.errors import ConfigError
    from cloud.config import load

    config = tmp_path / "fleet.toml"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config.write_text(f'[s3]\nbucket = "b"\n[serve]\ntoken_file = "{token_file}"\n')
    assert load(config).serve.secret() == TOKEN
    config.write_text(f'[s3]\nbucket = "b"\n[serve]\ntoken = "{TOKEN}"\ntoken_file = "{token_file}"\n')
    with pytest.raises(ConfigError, match="not both"):
        load(config)
    config.write_text('[s3]\nbucket = "b"\n[serve]\ntoken = "short"\n')
    with pytest.raises(ConfigError, match="at least 16"):
        load(config)
