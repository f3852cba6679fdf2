"""The demo: its functions, the hot-swap underneath, the launched app via gradio_client, and a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from demo_fixtures import build, free_port, tiny_llama, tokenizer
from peft import PeftModel, get_peft_model
from sparse_peft.demo.state import DemoError

from sparse_peft import SparseDeltaConfig
from sparse_peft.hotswap import BASE, AdapterSwitcher

ARTIFACTS = Path(__file__).resolve().parents[1] / ".cache" / "test-artifacts"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def state(folders):
    from sparse_peft.demo.state import DemoState

    base, adapters = folders
    return DemoState.load(adapters, str(base))


# ------------------------------------------------------------------ hot-swap
def _two_adapter_model() -> PeftModel:
    model = get_peft_model(tiny_llama(), SparseDeltaConfig(target_modules="all-linear", density=0.2,
                                                           init_weights=False, seed=1), adapter_name="first")
    model.add_adapter("second", SparseDeltaConfig(target_modules="all-linear", density=0.2, init_weights=False, seed=2))
    return model


def test_switching_restores_base_weights_exactly_and_answers_match():
    model = _two_adapter_model()
    x = torch.randint(3, 64, (1, 8))
    base_weights = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    expected = {}
    for name in ("first", "second"):
        model.set_adapter(name)
        expected[name] = model(x).logits
    switcher = AdapterSwitcher(model)
    for i in range(200):
        name = ("first", "second", BASE)[i % 3]
        with switcher.using(name) as m:
            if i < 6:
                out = m(x).logits
                if name == BASE:
                    assert torch.equal(out, tiny_llama()(x).logits)
                else:
                    torch.testing.assert_close(out, expected[name], rtol=1e-5, atol=1e-6)
    switcher.activate(BASE)
    weights = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in model.state_dict().items() if "sparse_delta" not in k}
    assert all(torch.equal(weights[k], v) for k, v in base_weights.items())


def test_serving_model_compiles_once_across_switches():
    import torch._dynamo.utils as dynamo_utils

    model = _two_adapter_model()
    switcher = AdapterSwitcher(model)
    serving = torch.compile(switcher.serving_model(), backend="eager")
    x = torch.randint(3, 64, (1, 8))
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    outs = {}
    for name in ("first", "second", BASE, "first", "second"):
        with switcher.using(name) as m:
            outs[name] = (serving(input_ids=x).logits, m(x).logits)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    for compiled, eager in outs.values():
        torch.testing.assert_close(compiled, eager)


def test_switcher_rejects_unknown_adapters_and_serialises_threads():
    model = _two_adapter_model()
    switcher = AdapterSwitcher(model)
    with pytest.raises(KeyError, match="No adapter named 'zzz'"):
        switcher.activate("zzz")
    x = torch.randint(3, 64, (2, 6))
    single = {}
    for name in ("first", "second", BASE):
        with switcher.using(name) as m, torch.no_grad():
            single[name] = m(x).logits

    def run(i: int) -> bool:
        name = ("first", "second", BASE)[i % 3]
        with switcher.using(name) as m, torch.no_grad():
            return torch.equal(m(x).logits, single[name])

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(run, range(60)))


# ------------------------------------------------------------------ demo functions
def test_loads_every_kind_and_reports_bad_adapters(state):
    assert set(state.names) == {"delta-a", "delta-b", "s2ft", "sora", "lora"}
    assert "Corrupt" in state.entries["corrupt"].error or "corrupt" in state.entries["corrupt"].error.lower()
    assert state.entries["gpt2-lora"].error  # an adapter for another architecture
    summary = state.summary()
    assert "corrupt" in summary and "not loaded" in summary


def test_missing_directory_gives_a_clear_error(tmp_path):
    from sparse_peft.demo.state import DemoError, DemoState

    with pytest.raises(DemoError, match="sparse-peft quickstart"):
        DemoState.load(tmp_path / "nope")


@pytest.mark.parametrize("adapter", ["delta-a", "s2ft", "sora", "lora"])
def test_generate_differs_from_base_and_is_deterministic(state, adapter):
    base, _ = state.generate("w1 w2 w3", BASE, max_new_tokens=8)
    text, _ = state.generate("w1 w2 w3", adapter, max_new_tokens=8)
    again, _ = state.generate("w1 w2 w3", adapter, max_new_tokens=8)
    assert text == again and text != base


def test_compose_merge_and_plot(state, tmp_path):
    from transformers import AutoModelForCausalLM

    message = state.compose("delta-a", "delta-b", 1.0, 0.5, "mix")
    assert "mix" in message and "ties" in message and "mix" in state.names
    assert state.generate("w4 w5", "mix")[0] != state.generate("w4 w5", BASE)[0]
    assert "sum(" in state.compose("delta-a", "delta-b", 1.0, 1.0, "plain-sum", "sum", 0.3)  # density unused
    with pytest.raises(DemoError, match="RegMean needs examples of each adapter's task"):
        state.compose("delta-a", "delta-b", 1.0, 1.0, "rm", "regmean")
    for method, density, error in (("average", 0.5, "Unknown composition method"), ("ties", 0.0, "in \\(0, 1\\]")):
        with pytest.raises(DemoError, match=error):
            state.compose("delta-a", "delta-b", 1.0, 1.0, "bad", method, density)
    assert "bad" not in state.names
    out = tmp_path / "merged"
    state.merge_and_save("s2ft", str(out))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer()("w1 w2 w3", return_tensors="pt")["input_ids"]
    generated = merged.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert tokenizer().decode(generated[0, 3:], skip_special_tokens=True) == state.generate("w1 w2 w3", "s2ft", 8)[0]
    for adapter in ("delta-a", "s2ft", "sora"):
        assert Path(state.layer_plot(adapter)).read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ the launched app
@pytest.fixture(scope="module")
def served(folders):
    from sparse_peft.demo.app import build_app

    base, adapters = folders
    app = build_app(adapters, str(base))
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_client_concurrent_requests_get_their_own_adapter(served, state):
    from gradio_client import Client

    client = Client(served, verbose=False)
    names = ["delta-a", "s2ft", "sora", BASE, "delta-b", "lora"]
    expected = {n: state.generate("w7 w8", n, max_new_tokens=6)[0] for n in names}
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="not in the list of choices"):  # refused by the app, server keeps going
        client.predict("w7 w8", "no-such-adapter", 6, False, 1.0, 1.0, 0, api_name="/generate")
    empty = client.predict("  ", "delta-a", 6, False, 1.0, 1.0, 0, api_name="/generate")
    assert "Enter a prompt" in empty[2]

    def ask(i: int) -> bool:
        name = names[i % len(names)]
        _, text, _ = client.predict("w7 w8", name, 6, False, 1.0, 1.0, 0, api_name="/generate")
        return text == expected[name].strip()  # the page shows answers without surrounding blanks

    with ThreadPoolExecutor(12) as pool:
        assert all(pool.map(ask, range(36)))  # zero wrong-adapter answers
    info = client.predict("w7 w8", "delta-a", 6, False, 1.0, 1.0, 0, api_name="/generate")[2]
    largest = int(re.search(r"up to (\d+) requests in one", info).group(1))
    assert largest > 1  # concurrent users were answered together, not one after another
    message = client.predict("delta-a", "delta-b", 1.0, 1.0, "client-mix", "dare_ties", 0.5, api_name="/compose")[0]
    assert "dare_ties" in message and "50%" in message


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (make test-setup installs it)")
def test_real_browser_selects_an_adapter_and_generates(served, tmp_path):
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page()
        page.goto(served)
        page.locator("#adapter input").click()
        page.get_by_role("option", name="base", exact=True).click()
        page.locator("#generate").click()
        output = page.locator("#adapter-output textarea")
        page.wait_for_function("() => document.querySelector('#adapter-output textarea').value.length > 0")
        base_text = output.input_value()
        page.locator("#adapter input").click()
        page.get_by_role("option", name="delta-a", exact=True).click()
        page.locator("#generate").click()
        page.wait_for_function(
            "(old) => { const v = document.querySelector('#adapter-output textarea').value; "
            "return v.length > 0 && v !== old; }",
            arg=base_text,
        )
        assert "mixed-adapter batch" in page.locator("#info").inner_text()  # greedy: the batched path
        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "demo.png")


@pytest.mark.slow
def test_cli_demo_refuses_a_missing_directory(tmp_path):
    run = subprocess.run([sys.executable, "-m", "sparse_peft.cli", "demo", "--adapters", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "sparse-peft quickstart" in run.stderr
    run = subprocess.run([sys.executable, "-m", "sparse_peft.cli", "demo", "--port", "99999"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "port" in run.stderr
