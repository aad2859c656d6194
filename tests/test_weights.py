"""``refrl weights list / download`` through the ``refrl`` command.

``list`` runs offline against an empty and then a filled Hugging Face cache. ``download``
runs against a stand-in hub: a small HTTP server on 127.0.0.1 (reached through
``HF_ENDPOINT``) that answers the requests ``huggingface_hub.snapshot_download`` makes
(``/api/models/REPO/revision/REV``, ``/api/models/REPO/tree/SHA``, ``/REPO/resolve/SHA/FILE``)
for tiny random-weight repos served at the preset's real hub ids. What it fetched is then
used offline: the generator's pipeline folder is complete and the CSD reward, built with
its default weights, scores images.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from refrl.rewards.zoo.style import CSD_BASE, CSD_HUB, CSD_HUB_FILE

GENERATOR = "stand-in/tiny-klein"  # model.pretrained of the test config


def refrl(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refrl", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)


def error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_csd_hub_layout(folder: Path) -> dict[str, bytes]:
    """The files of yuxi-liu-wired/CSD (model.safetensors, names under ``backbone.``) and of
    openai/clip-vit-large-patch14 (config.json), tiny: from `refrl.rewards.zoo.tiny`."""
    import torch
    from safetensors.torch import save_file

    from refrl.rewards.zoo.tiny import save_tiny

    options = save_tiny("csd", folder)
    state = torch.load(options["checkpoint"], weights_only=True)["model_state_dict"]
    save_file({k.removeprefix("module."): v.contiguous() for k, v in state.items()}, folder / "hub.safetensors")
    return {"weights": (folder / "hub.safetensors").read_bytes(), "config": (Path(options["base"]) / "config.json").read_bytes()}


class StandInHub:
    """Serves ``repos`` ({repo_id: {path: bytes}}) at one commit each, as the hub's HTTP API does."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.sha = {r: hashlib.sha1(r.encode()).hexdigest() for r in repos}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def send(self, code: int, payload: bytes, headers: dict[str, str], body: bool):
                self.send_response(code)
                for k, v in {"Content-Length": str(len(payload)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def answer(self, body: bool):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                for repo, files in hub.repos.items():
                    sha = hub.sha[repo]
                    if path.startswith(f"/api/models/{repo}/revision/"):
                        info = {"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]}
                        return self.send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                    if path.startswith(f"/api/models/{repo}/tree/"):
                        tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                for f, b in files.items()]
                        return self.send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
                    prefix = f"/{repo}/resolve/"
                    if path.startswith(prefix):
                        name = path[len(prefix):].split("/", 1)[1]
                        if name in files:
                            data = files[name]
                            etag = f'"{hashlib.sha256(data).hexdigest()}"'
                            return self.send(200, data, {"X-Repo-Commit": sha, "ETag": etag}, body)
                        return self.send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, body)
                return self.send(404, b"", {"X-Error-Code": "RepoNotFound"}, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from refrl.models.diffusers.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("repos")
    pipeline = files_of(save_tiny_pipeline("flux2-klein", root / "pipe"))
    csd = tiny_csd_hub_layout(root / "csd")
    server = StandInHub({
        GENERATOR: pipeline,
        CSD_HUB: {CSD_HUB_FILE: csd["weights"], "README.md": b"CSD"},
        CSD_BASE: {"config.json": csd["config"], "pytorch_model.bin": b"not fetched: only the config is needed"},
    })
    yield server
    server.close()


@pytest.fixture
def work(tmp_path):
    """A config naming the stand-in generator and the CSD reward with its default weights."""
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model: {{kind: flux2-klein, pretrained: {GENERATOR}, init: runs/my-sft}}\n"
                      "rewards:\n  - {name: csd, weight: 1.0}\n  - {name: identity, weight: 1.0}\n")
    return tmp_path, config


def test_list_offline_then_download_from_a_stand_in_hub(hub, work):
    tmp, config = work
    cache = tmp / "hf-cache"
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    res = refrl("weights", "list", "--config", str(config), cwd=tmp, env=offline)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = res.stdout.splitlines()
    assert any(GENERATOR + "@main" in r and "transformer/" in r and r.endswith("missing") for r in rows), rows
    assert any(CSD_HUB + "@main" in r and CSD_HUB_FILE in r and r.endswith("missing") for r in rows), rows
    assert any(CSD_BASE + "@main" in r and "config.json" in r and r.endswith("missing") for r in rows), rows
    assert any("runs/my-sft" in r and r.endswith("not found") for r in rows), rows
    assert rows[-1] == (f"4 weight folders, 3 missing: fetch them where there is network with "
                        f"`refrl weights download --config {config}`")

    res = refrl("weights", "download", "--config", str(config), cwd=tmp,
                env={"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0",
                     "HF_HUB_DISABLE_XET": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skip start checkpoint (model.init): local runs/my-sft" in res.stdout
    assert not any("pytorch_model.bin" in r for r in hub.requests)  # only the files the config needs

    res = refrl("weights", "list", "--config", str(config), cwd=tmp, env=offline)
    rows = res.stdout.splitlines()
    assert res.returncode == 0 and rows[-1] == "4 weight folders, 0 missing", "\n".join(rows)
    generator = next(r for r in rows if GENERATOR in r)
    size = sum(len(b) for f, b in hub.repos[GENERATOR].items())
    assert generator.endswith("present") and f"{size / 1e6:.1f} MB" in generator or f"{size / 1e3:.1f} KB" in generator

    # what was fetched is what refrl loads, offline: the default CSD weights score images
    script = ("import torch; from refrl.rewards.registry import build; from refrl.models.diffusers.loading import "
              f"resolve_pretrained; print(resolve_pretrained('{GENERATOR}', ['transformer', 'vae', 'scheduler', "
              "'text_encoder', 'tokenizer'])); r = build('csd', against='target'); "
              "from refrl.data.refworld import RefWorld; s = RefWorld(size=32).generate(2, seed=0); "
              "print(r(torch.stack([x.target for x in s]), s).scores.tolist())")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp, timeout=300,
                         env={**os.environ, **offline})
    assert res.returncode == 0, res.stderr[-2000:]
    folder, scores = res.stdout.strip().splitlines()[-2:]
    assert Path(folder).is_relative_to(cache)
    assert json.loads(scores) == pytest.approx([1.0, 1.0], abs=1e-5)  # an image's style equals its own


def test_download_into_a_folder_for_another_machine(hub, work):
    tmp, config = work
    res = refrl("weights", "download", "--config", str(config), "--to", str(tmp / "bundle"), cwd=tmp,
                env={"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp / "unused"), "HF_HUB_OFFLINE": "0",
                     "HF_HUB_DISABLE_XET": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"set HF_HUB_CACHE={tmp / 'bundle'} there" in res.stdout
    assert not (tmp / "unused").exists()
    res = refrl("weights", "list", "--config", str(config), cwd=tmp,
                env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp / "bundle")})
    assert res.stdout.splitlines()[-1] == "4 weight folders, 0 missing"


def test_download_without_network_leaves_nothing(work):
    tmp, config = work
    cache = tmp / "hf-cache"
    (cache / "models--other--repo").mkdir(parents=True)  # someone's cache, to be left as it is
    (cache / "models--other--repo" / "keep").write_text("x")
    before = {str(p.relative_to(cache)) for p in cache.rglob("*")}
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    res = refrl("weights", "download", "--config", str(config), cwd=tmp,
                env={"HF_ENDPOINT": f"http://127.0.0.1:{closed}", "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0",
                     "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    assert res.returncode == 1, res.stderr[-2000:]
    (line,) = error_lines(res)
    assert line.startswith(f"error: cannot download {GENERATOR}@main (generator flux2-klein) from http://127.0.0.1:")
    assert "Traceback" not in res.stderr
    assert {str(p.relative_to(cache)) for p in cache.rglob("*")} == before


def test_bad_config_is_one_line(tmp_path):
    res = refrl("weights", "list", "--config", "no-such-preset", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2 and error_lines(res) == [error_lines(res)[0]]
    assert "unknown preset 'no-such-preset'" in error_lines(res)[0] and "tiny-cpu-grpo" in error_lines(res)[0]
    res = refrl("weights", "download", "--config", "flux2-klein-grpo", cwd=tmp_path,
                env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 2 and error_lines(res) == [
        "error: HF_HUB_OFFLINE is set, so nothing can be downloaded: run `HF_HUB_OFFLINE=0 refrl weights download "
        "--config flux2-klein-grpo` on a machine with internet"]
    assert not (tmp_path / "cache").exists()


def test_sources_of_an_eval_config_follow_its_checkpoint(tmp_path):
    """An eval config needs its checkpoint, the base pipeline that checkpoint's config.json names
    (only the parts it loads), and its metrics' backbones; embedded metrics need nothing."""
    from refrl.weights import config_sources

    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"kind": "kontext", "pretrained": "black-forest-labs/FLUX.1-Kontext-dev",
                                                  "model": {"diffusers": {"load_text_encoder": False}}}))
    sources = config_sources({"suite": "manifest", "ckpt": str(ckpt), "rewards": "fidelity=dreamsim,psnr_inside,style=csd",
                              "reward_options": {"style": {"checkpoint": str(tmp_path / "csd.pth")}}})
    assert [(s.role, s.name) for s in sources] == [
        ("checkpoint (ckpt)", str(ckpt)),
        ("generator kontext", "black-forest-labs/FLUX.1-Kontext-dev@main"),
        ("metric fidelity", "-"),
        ("metric style", str(tmp_path / "csd.pth")),
        ("metric style (base config)", f"{CSD_BASE}@main"),
    ]
    assert sources[1].patterns == ("model_index.json", "transformer/*", "vae/*", "scheduler/*")  # no text encoders
    assert "dreamsim package" in sources[2].note
