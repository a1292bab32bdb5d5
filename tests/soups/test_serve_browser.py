"""The live page in a real browser: headless Chromium (Debian's chromium + chromium-driver, via selenium).

Moves a slider, clicks Generate, reads the soup's output from the page and checks it against a fresh `Soup` set
to the λ the page shows (greedy); then checks that a bad λ is reported on the page and the page keeps working.
The screenshot goes to the test's tmp dir, or to $SOUPS_SERVE_SCREENSHOT (docs/images/serve.png is made so).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("selenium")

from serve_fixtures import reference_output, smoke_server  # noqa: E402

from soups.serve_live import check_lambdas  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(
        "chromium/chromedriver not installed (.ci/run installs them: apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1100",
        "--disable-extensions",
        "--no-first-run",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_slider_generate_output_equals_the_soup_at_that_lambda(browser, tmp_path_factory) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    workdir = tmp_path_factory.mktemp("serve_browser")
    with smoke_server(workdir) as (engine, _, url):
        browser.get(url + "/")
        slider = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#lambda-0 input[type=range]"))
        prompt = browser.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value")
        assert prompt == engine.live.examples(1)[0]

        # 1. move the first slider left of its middle (0.5), by dragging its thumb
        ActionChains(browser).click_and_hold(slider).move_by_offset(-slider.size["width"] // 4, 0).release().perform()
        values = [float(browser.find_element(By.CSS_SELECTOR, f"#lambda-{i} input[type=number]")
                        .get_attribute("value")) for i in range(engine.n_experts)]  # fmt: skip
        assert values[0] < 0.5 and values[1] == 0.5, values
        lam = check_lambdas(values, engine.n_experts)
        shown = ", ".join(f"{name} {x:.3f}" for name, x in zip(engine.expert_names, lam))

        # 2. click generate; 3. read the output once the page shows this λ and is idle (λ, output and status
        # arrive together; the slider's release already asked for the same λ, so either answer is this λ's)
        browser.find_element(By.CSS_SELECTOR, "#generate").click()

        def settled(d):
            done = d.find_element(By.CSS_SELECTOR, "#status").text == "ok"
            return done and shown in d.find_element(By.CSS_SELECTOR, "#lambda-normalised").text

        wait.until(settled)
        output = browser.find_element(By.CSS_SELECTOR, "#soup-output textarea").get_attribute("value")
        assert output

        # 4. what a fresh Soup set to that λ produces, greedy
        assert output == reference_output(engine.experts, lam, prompt, engine.max_new_tokens)
        for i in range(engine.n_experts):  # the experts' outputs beside it, for the same prompt
            vertex = [1.0 if j == i else 0.0 for j in range(engine.n_experts)]
            shown_expert = browser.find_element(By.CSS_SELECTOR, f"#expert-output-{i} textarea").get_attribute("value")
            assert shown_expert == reference_output(engine.experts, vertex, prompt, engine.max_new_tokens)

        # 5. the screenshot
        target = Path(os.environ.get("SOUPS_SERVE_SCREENSHOT") or workdir / "serve.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(target)) and target.stat().st_size > 10_000

        # a bad λ (all zero) is a message on the page, not a traceback; the page keeps serving afterwards
        for i in range(engine.n_experts):
            box = browser.find_element(By.CSS_SELECTOR, f"#lambda-{i} input[type=number]")
            box.clear()
            box.send_keys("0")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: "sum to 0" in d.find_element(By.CSS_SELECTOR, "#status").text)
        box.clear()
        box.send_keys("1")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#status").text == "ok")
        last = engine.expert_names[-1]
        assert f"{last} 1.000" in browser.find_element(By.CSS_SELECTOR, "#lambda-normalised").text
        vertex = [0.0] * (engine.n_experts - 1) + [1.0]
        assert browser.find_element(By.CSS_SELECTOR, "#soup-output textarea").get_attribute("value") == \
            reference_output(engine.experts, vertex, prompt, engine.max_new_tokens)  # fmt: skip


@pytest.mark.slow  # a second server of three experts (~10 s more); the two-expert test above covers the page
def test_triangle_click_sets_lambda_for_three_experts(browser, tmp_path_factory) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from soups.serve import triangle_lambdas

    wait = WebDriverWait(browser, 60)
    with smoke_server(tmp_path_factory.mktemp("serve_tri"), ["smoke.n_experts=3"]) as (engine, _, url):
        browser.get(url + "/")
        image = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#lambda-triangle img"))
        wait.until(lambda d: image.size["width"] > 0)
        # the image is shown at its natural 240 px: offsets from its centre are pixels of the triangle
        assert image.size == {"width": 240, "height": 240}, image.size
        ActionChains(browser).move_to_element_with_offset(image, -60, 60).click().perform()
        expected = triangle_lambdas(60, 180)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#status").text == "ok")
        values = [float(browser.find_element(By.CSS_SELECTOR, f"#lambda-{i} input[type=number]").get_attribute("value"))
                  for i in range(3)]  # fmt: skip
        assert values == pytest.approx(expected, abs=0.011), (values, expected)  # ±1 px of rounding
        lam = check_lambdas(values, 3)
        prompt = browser.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value")
        output = browser.find_element(By.CSS_SELECTOR, "#soup-output textarea").get_attribute("value")
        assert output == reference_output(engine.experts, lam, prompt, engine.max_new_tokens)
