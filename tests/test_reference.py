"""docs/reference/ is generated from the typer app and the pydantic configs; it must match them."""

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_pages_match_the_code():
    gen = load_generator()
    for path, text in gen.pages().items():
        where = path.relative_to(ROOT)
        assert path.exists(), f"{where} is missing: run `{gen.REGENERATE}`"
        assert path.read_text() == text, f"{where} is out of date with the code: run `{gen.REGENERATE}`"


def test_reference_lists_every_command_option_and_config_key():
    """What the pages hold, checked against the sources they are made from."""
    import typer

    from refrl.cli import app
    from refrl.eval.config import EvalConfig
    from refrl.train.grpo_config import GRPOConfig

    gen = load_generator()
    cli = gen.render_cli()
    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        if command.hidden:
            assert f"## `refrl {name}`" not in cli  # an alias is named under its command, not listed
            continue
        assert f"## `refrl {name}`" in cli
        for param in command.params:
            if getattr(param, "param_type_name", "") == "option" and not param.hidden:
                assert f"`{param.opts[0]}`" in cli, (name, param.opts)
    assert "Also: `refrl grpo` (hidden alias)." in cli
    # a required option is marked required, an optional one shows its default
    assert "| `--out` | path | **required** | Output folder (images/ cache" in cli
    config = gen.render_config()
    for key in ("`objective` | grpo \\| nft \\| awm | `grpo`", "`nft.beta` | float | `1.0` | > 0",
                "`matching.k` | int", "`sampling.sde_steps` | all \\| window \\| random_one \\| none",
                "`rewards[].weight` | float | `1.0`", "`advantage.kind`"):
        assert key in config, key
    # nested defaults come from the parent's default: GRPO's optimizer is not SFT's
    sft_part, rl_part = config.split("## RL: ")[0], config.split("## RL: ")[1].split("## Evaluation")[0]
    assert "| `optim.lr` | float | `0.0005`" in sft_part and "| `optim.lr` | float | `0.0001`" in rl_part
    for model in (GRPOConfig, EvalConfig):
        for row in gen.config_rows(model):
            assert f"| `{row[0]}` |" in config


def test_stale_page_fails_the_check(tmp_path, monkeypatch, capsys):
    gen = load_generator()
    stale = tmp_path / "cli.md"
    stale.write_text("old\n")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "pages", lambda: {stale: "new\n"})
    assert gen.main(["--check"]) == 1
    assert "out of date: cli.md; run `python scripts/gen_reference.py`" in capsys.readouterr().err
    assert stale.read_text() == "old\n"  # --check writes nothing
    assert gen.main([]) == 0 and stale.read_text() == "new\n"
