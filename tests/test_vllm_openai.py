"""``vllm serve`` on a MASQuant export, asked by the ``openai`` client as a user would (needs the vLLM
venv: scripts/setup_vllm.sh; skipped elsewhere): image chat requests get the answers masquant's own
runtime generates, and a corrupt image gets an HTTP 400, after which the server still answers."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("openai")

import openai

from masquant import QuantConfig, quantize, save
from masquant.io.export_vllm import export_vllm
from masquant.refmodels import registry
from masquant.refmodels.evaluate import calibration_inputs
from masquant.refmodels.processor import to_rgb
from masquant.refmodels.tasks import TEMPLATES, qa_messages

pytestmark = pytest.mark.vllm

START_TIMEOUT = 300  # seconds for `vllm serve` to load the model and answer /health


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model, processor = registry.load("ref-vl")
    quantize(model, calibration_inputs(processor, "ref-vl")[::4],
             QuantConfig(method="masquant", w_bits=4, a_bits=8, rank=32, epochs=1), progress=False)
    save(model, root / "q", processor=processor, reference="ref-vl")
    export_vllm(root / "q", root / "served")
    port, log = _free_port(), root / "serve.log"
    command = [str(Path(sys.executable).parent / "vllm"), "serve", str(root / "served"), "--port", str(port),
               "--dtype", "float32", "--max-model-len", "512", "--limit-mm-per-prompt", '{"image": 2, "video": 0}']
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`vllm serve` did not come up (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        yield client, client.models.list().data[0].id, model, processor
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def _data_url(payload: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(payload).decode()


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _ask(client, name: str, url: str, question: str) -> str:
    reply = client.chat.completions.create(
        model=name, max_tokens=4, temperature=0.0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": question}]}])
    return reply.choices[0].message.content.strip()


@torch.no_grad()
def _runtime_answer(model, processor, image, template: int) -> str:
    text = processor.apply_chat_template(qa_messages("item", template), add_generation_prompt=True)
    batch = processor([text], images=[image], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    return processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_image_chat_requests_get_the_runtimes_answers(server):
    client, name, model, processor = server
    images = registry.slices("ref-vl", "test")["item"][0]
    for i in range(4):
        image = to_rgb(images[i])
        served = _ask(client, name, _data_url(_png(image)), TEMPLATES["item"][i % 5])
        assert served, "the server answered with an empty message"
        assert served == _runtime_answer(model, processor, image, i % 5)


def test_a_corrupt_image_is_a_bad_request_and_the_server_lives_on(server):
    client, name, *_ = server
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, name, _data_url(b"\x89PNG\r\n\x1a\nnot an image"), TEMPLATES["item"][0])
    assert err.value.status_code == 400 and "image" in str(err.value).lower()
    reply = client.chat.completions.create(model=name, max_tokens=3, temperature=0.0,
                                           messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content is not None
