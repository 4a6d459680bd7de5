"""`fastpost serve` through its API (gradio_client), on the tiny CogVideoX pipeline at Ulysses sp=2 on CPU gloo:
outputs equal `fastpost sample` with the same settings, bad requests get a message and the next request works,
request paths stay inside their folders, and a killed worker makes the server say so and exit non-zero.

One server (two processes, started as torchrun would start them) serves the whole module, in test order.
"""

from __future__ import annotations

import json
import multiprocessing.forkserver
import os
import shutil
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("gradio_client", reason="the serve extra is not installed: pip install -e '.[serve]'")
from gradio_client import Client  # noqa: E402

from fastpost.distributed.parallel_dims import free_port  # noqa: E402
from fastpost.sampling import SampleError, main as sample_main  # noqa: E402
from fastpost.serve.paths import confined, list_loras  # noqa: E402
from tests._harness import _PRELOAD, _worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "docs" / "assets"
BASE = {"height": 48, "width": 80, "num_frames": 9, "steps": 2}  # 45 video tokens: sp=2 pads
REQ_A = dict(prompt="a red ball", negative_prompt="blue square", steps=3, guidance_scale=5.0, seed=5, height=32,
             width=48, num_frames=5, sampler="dpm", lora="good", lora_scale=0.7)
REQ_B = dict(prompt="green tree", negative_prompt="", steps=2, guidance_scale=4.0, seed=3, height=48, width=80,
             num_frames=9, sampler="ddim", lora="", lora_scale=1.0)
FIELDS = ["prompt", "negative_prompt", "steps", "guidance_scale", "seed", "height", "width", "num_frames", "sampler",
          "lora", "lora_scale", "image"]


def _write_lora(out: Path) -> None:
    """A diffusers-format LoRA for the debug flavor (adapter weights perturbed, alpha != rank)."""
    import diffusers
    from peft import get_peft_model_state_dict

    from fastpost.lora import LoRAConfig, inject_lora
    from fastpost.models import get_family

    model = get_family("cogvideox").load(None, "debug")
    inject_lora(model, LoRAConfig(enabled=True, rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    diffusers.CogVideoXPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(model),
                                                  transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())


def _overrides(pipe: Path) -> list[str]:
    return [f"model.pretrained={pipe}", *(f"{k}={v}" for k, v in BASE.items()), "save_latents=true",
            "progress_bar=false"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.test_sampling import _pipeline

    # the forkserver imports (with gradio for rank 0) while this process builds the pipeline; in a full run it is
    # already up (earlier modules started it) and this does nothing
    multiprocessing.forkserver.set_forkserver_preload(_PRELOAD + ["gradio"])
    multiprocessing.forkserver.ensure_running()
    root = tmp_path_factory.mktemp("serve")
    pipe = _pipeline("cogvideox", root)
    loras = root / "loras"
    _write_lora(loras / "good")
    (loras / "broken").mkdir()
    (loras / "broken" / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    shutil.copytree(loras / "good", root / "secret")  # a valid LoRA outside the folder: only confinement stops it
    port, out = free_port(), root / "out"
    argv = ["--config", "configs/cogvideox/sample_debug.yaml", "--port", str(port), "--lora-dir", str(loras),
            "--output-dir", str(out), *_overrides(pipe), "parallel.ulysses=2", "parallel.timeout_s=30"]
    # two ranks as torchrun would start them (RANK, WORLD_SIZE, MASTER_*), forked from the harness's preloaded
    # forkserver (torch + diffusers already imported: most of a cold start on 2 cores)
    ctx = mp.start_processes(_worker, args=(2, free_port(), _serve_rank, (argv, str(root))), nprocs=2, join=False,
                             start_method="forkserver")
    procs = ctx.processes
    log = root / "rank0.log"
    try:
        # while the server starts (rank 1 idles while rank 0 imports gradio), `fastpost sample` makes the references
        refs = {name: _sample(pipe, loras, root / f"ref_{name}", req) for name, req in (("a", REQ_A), ("b", REQ_B))}
        deadline = time.time() + 120
        while not log.is_file() or "ready on" not in log.read_text():
            assert all(p.is_alive() for p in procs), log.read_text() if log.is_file() else "no log"
            assert time.time() < deadline, "the server did not start in 120 s"
            time.sleep(0.1)
        yield {"url": f"http://127.0.0.1:{port}/", "procs": procs, "root": root, "out": out, "refs": refs,
               "log": log}
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()


def _serve_rank(rank: int, world: int, argv: list[str], root: str) -> None:
    """`fastpost serve ARGV` on one rank (the harness made the process group), its output in <root>/rank<r>.log."""
    fd = os.open(os.path.join(root, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from fastpost.serve.main import main

    code = main(argv)
    if code:
        os._exit(code)


@pytest.fixture(scope="module")
def client(server):
    return Client(server["url"], verbose=False)


def _call(client, req: dict):
    args = [req.get(f, "") for f in FIELDS]
    return client.predict(*args, api_name="/generate")


def _frames(path) -> np.ndarray:
    reader = imageio.get_reader(path, format="FFMPEG")
    frames = np.stack([f for f in reader])
    reader.close()
    return frames


def _sample(pipe: Path, loras: Path, out: Path, req: dict) -> tuple[torch.Tensor, np.ndarray]:
    """`fastpost sample` (world 1, in this process) with the request's settings: its latents and frames."""
    lora = [f"model.lora={loras / req['lora']}", f"model.lora_scale={req['lora_scale']}"] if req["lora"] else []
    argv = ["--config", "configs/cogvideox/sample_debug.yaml", "--prompt", req["prompt"], "--output-dir",
            str(out), *_overrides(pipe), f"negative_prompt={req['negative_prompt']}",
            *(f"{k}={req[k]}" for k in ("steps", "guidance_scale", "seed", "height", "width", "num_frames",
                                         "sampler")), *lora]
    assert sample_main(argv) == 0
    return torch.load(next(out.glob("*.latents.pt"))), _frames(next(out.glob("*.mp4")))


def _served(server, result) -> tuple[torch.Tensor, np.ndarray, dict]:
    video, files, note = result[0], result[1], result[2]
    meta = json.loads(Path(next(f for f in files if str(f).endswith(".json"))).read_text())
    steps = meta["steps"]
    assert f"{steps}/{steps} steps" in note, note  # every step's progress event reached the page's handler
    video = video["video"] if isinstance(video, dict) else video
    latents = torch.load(server["out"] / meta["latents"])
    return latents, _frames(video), meta


def test_requests_equal_fastpost_sample_and_errors_are_contained(server, client):
    # A: a LoRA from the folder, another sampler and size; the adapter runs unfused beside the base weights
    served_a, frames_a, meta_a = _served(server, _call(client, REQ_A))
    ref_a, ref_frames_a = server["refs"]["a"]
    assert meta_a["lora"].endswith("good") and meta_a["seed"] == 5 and meta_a["sampler"] == "dpm"
    assert meta_a["parallel"]["ulysses"] == 2 and frames_a.shape == ref_frames_a.shape
    assert meta_a["request"]["lora"] == "good"
    err_a = (served_a - ref_a).abs().max().item()
    print(f"LoRA request (unfused adapter, sp=2) vs fastpost sample (fused, world 1): max latent error {err_a:.2e}")
    assert err_a <= 1e-5 * max(1.0, ref_a.abs().max().item()), f"LoRA request vs fastpost sample: {err_a:.2e}"

    # bad requests: a message each, the workers stay up
    bad = {"num_frames=8 is not valid": {**REQ_B, "num_frames": 8},
           "could not be loaded": {**REQ_B, "lora": "broken"},
           "'..' are refused": {**REQ_B, "lora": "../secret"},
           "absolute paths": {**REQ_B, "lora": str(server["root"] / "secret")},
           "holds no readable": {**REQ_B, "lora": "nothing_here"}}
    for message, req in bad.items():
        with pytest.raises(Exception, match=message):
            _call(client, req)

    # B: no LoRA after all that: the base model is back exactly (the adapter was removed, nothing reloaded)
    served_b, frames_b, meta_b = _served(server, _call(client, REQ_B))
    ref_b, ref_frames_b = server["refs"]["b"]
    assert meta_b["lora"] is None and meta_b["request_index"] == 1
    assert torch.equal(served_b, ref_b), f"request vs fastpost sample: {(served_b - ref_b).abs().max():.2e}"
    assert np.array_equal(frames_b, ref_frames_b)
    assert np.abs(frames_a.astype(int) - ref_frames_a.astype(int)).max() <= 1
    assert sorted(p.name for p in server["out"].glob("*.mp4")) == ["0000_a_red_ball.mp4", "0001_green_tree.mp4"]


def test_requests_wait_in_line_and_see_their_position(server, client):
    from gradio_client.utils import Status

    first = client.submit(*[{**REQ_B, "steps": 30, "seed": 9}.get(f, "") for f in FIELDS], api_name="/generate")
    while first.status().code not in (Status.PROCESSING, Status.PROGRESS, Status.FINISHED):
        time.sleep(0.02)
    second = client.submit(*[{**REQ_B, "seed": 10}.get(f, "") for f in FIELDS], api_name="/generate")
    positions = set()
    while not second.done():
        status = second.status()
        if status.code == Status.IN_QUEUE and status.rank is not None:
            positions.add(status.rank)
        time.sleep(0.02)
    assert first.done() and positions == {0}, positions  # it waited, first in line, while the other ran
    assert "30/30 steps" in first.result()[2] and "2/2 steps" in second.result()[2]


def test_page_serves_outputs_but_no_other_file(server, client):
    import urllib.error
    import urllib.request

    def status(path: Path) -> int:
        try:
            return urllib.request.urlopen(f"{server['url']}gradio_api/file={path}", timeout=30).status
        except urllib.error.HTTPError as e:
            return e.code

    assert status(next(server["out"].glob("*.json"))) == 200
    for path in (ROOT / "setup.py", server["root"] / "secret" / "pytorch_lora_weights.safetensors",
                 server["root"] / "loras" / "good" / "pytorch_lora_weights.safetensors", Path("/etc/passwd")):
        assert status(path) in (403, 404), path


def test_paths_are_confined(tmp_path):
    (tmp_path / "loras" / "x" / "y").mkdir(parents=True)
    (tmp_path / "loras" / "x" / "y" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (tmp_path / "outside").mkdir()
    (tmp_path / "loras" / "link").symlink_to(tmp_path / "outside")
    root = tmp_path / "loras"
    assert confined(root, "x/y", "LoRA") == (root / "x" / "y").resolve()
    assert list_loras(root) == ["x/y"]
    for name, message in [("../outside", r"'\.\.' are refused"), ("x/../../outside", r"'\.\.' are refused"),
                          (str(tmp_path / "outside"), "absolute paths"), ("/etc", "absolute paths"),
                          ("link", "leads outside")]:
        with pytest.raises(SampleError, match=message):
            confined(root, name, "LoRA")
    with pytest.raises(SampleError, match="start it with --image-dir"):
        confined(None, "a.png", "image")


def _browser_missing() -> str | None:
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        return "no chromium / chromedriver on PATH (Debian: apt-get install chromium chromium-driver; `make test-browser`)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (`make test-browser` installs it)"
    return None


def _save_png(png: bytes, path: Path) -> None:
    """A 256-colour PNG: the docs' screenshot stays small in the repository."""
    import io

    from PIL import Image

    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(path, optimize=True)


@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_real_browser_generates_plays_and_restores(server):
    """Headless Chromium: type a prompt, submit, wait for the video, check the browser decoded it and that the file
    decodes here; click the gallery entry of an earlier request to restore its settings; screenshot for the docs."""
    import urllib.request

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,1500", "--mute-audio"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=shutil.which("chromedriver")))
    wait = WebDriverWait(driver, 120, poll_frequency=0.2)
    try:
        driver.get(server["url"])
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        box.clear()
        box.send_keys("a paper boat on a pond")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        video = wait.until(lambda d: next((v for v in d.find_elements(By.CSS_SELECTOR, "#result video")
                                           if v.get_attribute("src")), None))
        decoded = "return [arguments[0].readyState, arguments[0].videoWidth, arguments[0].videoHeight]"
        state = wait.until(lambda d: (s := d.execute_script(decoded, video)) and s[0] >= 2 and s)
        assert state[1:] == [BASE["width"], BASE["height"]], state  # the browser decoded a frame of the right size
        src = video.get_attribute("src")
        local = server["root"] / "browser.mp4"
        local.write_bytes(urllib.request.urlopen(src, timeout=30).read())
        assert _frames(local).shape[1:] == (BASE["height"], BASE["width"], 3)
        meta = json.loads(max(server["out"].glob("*.json")).read_text())
        assert meta["prompt"] == "a paper boat on a pond"
        # only `make test-browser` refreshes the docs' screenshot: a plain `make test` leaves the tree unchanged
        shot = ASSETS / "serve.png" if os.environ.get("FASTPOST_SCREENSHOT") == "docs" else server["root"] / "serve.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        _save_png(driver.get_screenshot_as_png(), shot)
        assert shot.stat().st_size > 0
        # the gallery: its first entry is request A; clicking it restores A's prompt and seed
        thumbs = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery button.thumbnail-item") or
                            d.find_elements(By.CSS_SELECTOR, "#gallery .thumbnail-item"))
        thumbs[0].click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value")
                   == REQ_A["prompt"])
    finally:
        driver.quit()


def test_lost_worker_is_reported_and_serve_exits_nonzero(server, client):
    """Runs last in this module: it kills a rank of the shared server."""
    rank0, rank1 = server["procs"]
    rank1.kill()  # SIGKILL
    rank1.join()
    with pytest.raises(Exception, match="worker process is gone"):
        _call(client, REQ_B)
    rank0.join(timeout=60)
    assert rank0.exitcode == 1
    assert "fastpost serve: error: a sampling worker process is gone" in server["log"].read_text()
