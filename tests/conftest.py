import os

# No network, ever: huggingface libraries must see this before they are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `make test` runs the suite on every core with pytest-xdist: one BLAS/OpenMP thread per
# worker (and per subprocess it starts), or the workers' thread pools fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    """A small random tiny-DiT policy saved to disk (the RL tests' ``model.init``)."""
    import torch

    from refrl.data.refworld.vocab import WORDS
    from refrl.models.tiny_dit import TinyDiTConfig
    from refrl.models.tiny_dit_policy import TinyDiTPolicy
    from refrl.models.tokenizer import WordTokenizer

    torch.manual_seed(0)
    tok = WordTokenizer.from_words(WORDS)
    policy = TinyDiTPolicy(tok, TinyDiTConfig(vocab_size=tok.vocab_size, width=32, depth=2, heads=2, prediction="v"))
    # Non-zero output head so rollouts depend on the weights (it is zero-initialised).
    with torch.no_grad():
        for p in policy.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("policy") / "tiny"
    policy.save_pretrained(path)
    return path


class Brightness:
    """Mean pixel value: a reward any working policy-gradient step can climb."""

    name = "brightness"

    def __call__(self, images, samples):
        from refrl.rewards.base import RewardOutput

        return RewardOutput(images.mean(dim=(1, 2, 3)))


@pytest.fixture
def brightness_reward() -> str:
    """Registers the ``brightness`` reward; returns its name."""
    from refrl.rewards.registry import register

    register("brightness", Brightness, overwrite=True)
    return "brightness"


@pytest.fixture
def launch():
    """``launch((n, args), ...)`` runs each ``python -m refrl ARGS`` as ``n`` CPU processes (gloo)
    under ``accelerate launch``, all at once, and asserts they succeeded; skips without the
    accelerate CLI."""
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.is_file():
        pytest.skip("accelerate CLI not installed")

    def command(n: int, args: list[str]) -> list[str]:
        # `--cpu` starts one process whatever --num_processes says (accelerate's simple launcher);
        # the multi-process launcher with no visible GPU starts n CPU processes
        mode = ["--multi_gpu"] if n > 1 else ["--cpu"]
        return [str(accelerate), "launch", *mode, "--num_processes", str(n), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "refrl", *args]

    def run(*jobs: tuple[int, list[str]]) -> None:
        """Each job ``(n, args)`` at the same time (a 1-process run leaves a core free beside a
        2-process one); every one must succeed."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
        procs = [subprocess.Popen(command(n, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env=env) for n, args in jobs]
        errors = [p.communicate(timeout=600)[1] for p in procs]
        for p, err in zip(procs, errors, strict=True):
            assert p.returncode == 0, err[-3000:]

    return run


# RefWorld samples the reward tests score (test_rewards.py, test_reward_registry.py)
@pytest.fixture(scope="module")
def world() -> list:
    """Every category, level 2 (patterns, textures and photos)."""
    from refrl.data.refworld.world import RefWorld

    return RefWorld(level=2).generate(48, seed=21)


@pytest.fixture(scope="module")
def plain() -> list:
    """Subjects on plain backgrounds without style or light: where cut-and-paste edits are exact."""
    from refrl.data.refworld.world import RefWorld

    return RefWorld(level=1, categories=["subject", "subject_layout"]).generate(16, seed=22)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Path:
    """A finished two-step SFT run folder (the CLI fault tests copy it before damaging it)."""
    from cli_helpers import make_sft_run

    return make_sft_run(tmp_path_factory.mktemp("sft_run") / "run")
