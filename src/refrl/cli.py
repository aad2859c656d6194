"""The ``refrl`` command line: one typer app.

Imports of heavy modules happen inside commands so ``refrl --help`` is instant.
Every error, from typer (bad or missing options) or from refrl (``RefrlError``), is
printed by `run` as one line ``error: ...`` on stderr with a non-zero exit code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="refrl",
    help="Train and evaluate reference-guided image generators: SFT, then GRPO with reward shaping.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: generate RefWorld, validate manifests, import other layouts.", no_args_is_help=True)
app.add_typer(data_app, name="data")

EXIT_USER_ERROR = 2  # bad options, config, data or paths: the user can fix it
EXIT_FAILURE = 1  # the system failed the command: out of memory, disk full, I/O errors
EXIT_INTERRUPTED = 130

# Output folders: a file in their place is refused while parsing the options; a folder
# that cannot be created or written, by `refrl.runfolder.files.prepare_out_dir` before any work.
OUT_DIR = {"file_okay": False, "writable": True}


def print_error(message: str) -> None:
    """The one line every failing command ends with (newlines folded: one error, one line)."""
    text = " ".join(str(message).split("\n")).strip()
    typer.secho(f"error: {text}", err=True, fg=typer.colors.RED)


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """Print one readable error line and exit."""
    print_error(message)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- data


@data_app.command("refworld")
def data_refworld(
    out: Annotated[Path, typer.Option(help="Output folder (manifest <split>.jsonl + PNGs).", **OUT_DIR)],
    n: Annotated[int, typer.Option(help="Number of samples.", min=1)] = 200,
    seed: Annotated[int, typer.Option(help="Seed; sample i depends only on (seed, i).")] = 0,
    split: Annotated[str, typer.Option(help="train | val | test (test uses unseen subject identities).")] = "train",
    size: Annotated[int, typer.Option(help="Image size in pixels (32 or 64).")] = 32,
    categories: Annotated[str | None, typer.Option(help="Comma-separated categories (default: all).")] = None,
    max_refs: Annotated[int, typer.Option(help="Maximum references per sample (1-7).", min=1, max=7)] = 7,
    level: Annotated[int | None, typer.Option(help="Difficulty 0-2 (0: solid colours, plain backgrounds).", min=0, max=2)] = None,
    preview: Annotated[bool, typer.Option(help="Also write preview.png (first 8 samples).")] = True,
) -> None:
    """Generate RefWorld multi-reference composition tasks (deterministic from the seed)."""
    from refrl.data.refworld import generate_refworld_to_disk
    from refrl.runfolder.files import prepare_out_dir

    cats = [c.strip() for c in categories.split(",") if c.strip()] if categories else None
    prepare_out_dir(out)
    manifest = generate_refworld_to_disk(
        out, n=n, seed=seed, split=split, size=size, categories=cats, max_refs=max_refs, level=level
    )
    typer.echo(f"wrote {n} samples: {manifest}")
    if preview:
        from refrl.data.manifest import load_manifest
        from refrl.data.refworld import write_preview_grid

        path = Path(out) / "preview.png"
        write_preview_grid(load_manifest(manifest)[:8], path)
        typer.echo(f"preview: {path}")


def _invalid_summary(report) -> str:
    return (f"{report.path}: {report.n_invalid} of {report.n_lines} lines invalid"
            + (f"; first: {report.errors[0]}" if report.errors else ""))


@data_app.command("validate")
def data_validate(
    manifest: Annotated[Path, typer.Argument(help="A JSONL manifest.")],
    skip_invalid: Annotated[bool, typer.Option(help="Report invalid lines but exit 0 if at least one line is valid.")] = False,
) -> None:
    """Check every line and every image of a manifest; exit 0 only if all are valid (2 if not)."""
    from refrl.data.manifest import format_report, validate_manifest

    report = validate_manifest(manifest, skip_invalid=skip_invalid)
    # the report lists every problem (a linter's output); the error line sums them up
    typer.echo(format_report(report, max_errors=None))
    if not report.ok:
        fail(_invalid_summary(report))


@data_app.command("import")
def data_import(
    kind: Annotated[str, typer.Argument(help="diffsynth | hf | dreambench")],
    src: Annotated[str, typer.Argument(help="Source file, folder, or (hf) dataset id / saved folder.")],
    out: Annotated[Path, typer.Option(help="Output folder for the manifest (and copied images).", **OUT_DIR)],
    split: Annotated[str, typer.Option(help="Dataset split (hf only).")] = "train",
    root: Annotated[Path | None, typer.Option(help="diffsynth: folder the image paths are relative to.")] = None,
    k: Annotated[int | None, typer.Option(help="dreambench: subject images per sample (default all).", min=1)] = None,
    unique_token: Annotated[str, typer.Option(help="dreambench: token before the class word, e.g. sks.")] = "",
    link: Annotated[str, typer.Option(help="hardlink | copy | symlink images into --out.")] = "hardlink",
    max_rows: Annotated[int | None, typer.Option(help="hf: import at most N rows.", min=1)] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing manifest.")] = False,
) -> None:
    """Import the DyRef/DiffSynth layout, a Hugging Face dataset, or DreamBench into a manifest."""
    from refrl.data.importers import import_command
    from refrl.data.manifest import format_report

    res = import_command(kind, src, out, root=root, split=split, k=k, unique_token=unique_token, link=link,
                         max_rows=max_rows, overwrite=force)
    typer.echo(f"wrote {res.n_samples} samples: {res.manifest}")
    if res.report is not None and not res.report.ok:
        typer.echo(format_report(res.report, max_errors=None))
        fail(f"the imported manifest is invalid: {_invalid_summary(res.report)}")


# --------------------------------------------------------------------------- training

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML preset (see configs/).")]
OverridesArg = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. optim.lr=1e-4")]
RunDirOpt = Annotated[Path | None, typer.Option(help="Run folder (default runs/<config name>).", **OUT_DIR)]


@app.command("sft")
def sft(
    config: ConfigOpt = Path("configs/tiny-cpu-sft.yaml"),
    overrides: OverridesArg = None,
    out: RunDirOpt = None,
    steps: Annotated[int | None, typer.Option(help="Override the number of steps.", min=1)] = None,
    seed: Annotated[int | None, typer.Option(help="Override the seed.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's latest checkpoint.")] = False,
) -> None:
    """Stage 1: supervised fine-tuning (rectified-flow loss) of a policy."""
    from refrl.config import load_config
    from refrl.train.sft import SFTConfig, train_sft

    extra = list(overrides or [])
    if steps is not None:
        extra.append(f"steps={steps}")
    if seed is not None:
        extra.append(f"seed={seed}")
    cfg = load_config(SFTConfig, config, extra)
    out = out or Path("runs") / Path(config).stem
    path = train_sft(cfg, out, resume=resume)
    typer.echo(f"checkpoint: {path}")


@app.command("grpo", help="Alias of `refrl rl` (objective: grpo | nft | awm in the config).")
@app.command("rl")
def rl(
    config: ConfigOpt = Path("configs/tiny-cpu-grpo.yaml"),
    overrides: OverridesArg = None,
    out: RunDirOpt = None,
    iterations: Annotated[int | None, typer.Option(help="Override the number of iterations.", min=1)] = None,
    seed: Annotated[int | None, typer.Option(help="Override the seed.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's latest checkpoint.")] = False,
) -> None:
    """Stage 2: RL (objective grpo | nft | awm) with reward shaping (group norm, GDPO, SARS/TDW, DRS/DAR); works with accelerate launch."""
    from refrl.config import load_config
    from refrl.train.grpo import train_grpo
    from refrl.train.grpo_config import GRPOConfig

    extra = list(overrides or [])
    if iterations is not None:
        extra.append(f"iterations={iterations}")
    if seed is not None:
        extra.append(f"seed={seed}")
    cfg = load_config(GRPOConfig, config, extra)
    out = out or Path("runs") / Path(config).stem
    path = train_grpo(cfg, out, resume=resume)
    typer.echo(f"checkpoint: {path}")


@app.command("generate")
def generate_cmd(
    ckpt: Annotated[str, typer.Option(help="tiny-sft, a run folder or a checkpoint folder.")],
    manifest: Annotated[Path, typer.Option(help="JSONL manifest of samples to generate for.")],
    out: Annotated[Path, typer.Option(help="Output folder (<id>.png per sample, grid.png).", **OUT_DIR)],
    limit: Annotated[int | None, typer.Option(help="Only the first N samples.", min=1)] = None,
    steps: Annotated[int, typer.Option(help="ODE steps.", min=1)] = 20,
    cfg: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale (1 = off).")] = 2.0,
    seed: Annotated[int, typer.Option(help="Seed; sample i uses noise (seed, i).")] = 0,
) -> None:
    """ODE sampling with classifier-free guidance; writes PNGs and grid.png (refs -> output -> target)."""
    from refrl.data.manifest import load_manifest
    from refrl.generate import generate

    samples = load_manifest(manifest)
    if limit is not None:
        samples = samples[:limit]
    paths = generate(ckpt, samples, out, steps=steps, cfg_scale=cfg, seed=seed)
    typer.echo(f"wrote {len(paths)} images and {out / 'grid.png'}")


@app.command("compare")
def compare_cmd(
    ckpt: Annotated[list[str], typer.Option(help="Checkpoints, in column order (repeat: --ckpt tiny-sft --ckpt runs/grpo).")],
    out: Annotated[Path, typer.Option(help="Output PNG.")],
    label: Annotated[list[str] | None, typer.Option(help="Column titles, one per --ckpt (default: folder names).")] = None,
    n: Annotated[int, typer.Option(help="Samples (rows).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the samples and of the noise (as refrl eval).")] = 0,
    split: Annotated[str, typer.Option(help="RefWorld split (test: unseen subjects).")] = "test",
    level: Annotated[int, typer.Option(help="RefWorld difficulty 0-2.")] = 2,
    steps: Annotated[int, typer.Option(help="ODE steps.")] = 20,
    cfg: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale.")] = 2.0,
) -> None:
    """The same RefWorld samples and noise drawn by each checkpoint, side by side (before/after RL)."""
    from refrl.eval.compare import compare_grid

    path = compare_grid(ckpt, out, labels=label, n=n, seed=seed, split=split, level=level, steps=steps, cfg_scale=cfg)
    typer.echo(f"wrote {path}")


# --------------------------------------------------------------------------- quickstart


@app.command("quickstart")
def quickstart(
    out: Annotated[Path, typer.Option(help="Run folder.", **OUT_DIR)] = Path("runs/quickstart"),
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """The main job on the embedded default, end to end; prints where the report is."""
    from refrl.quickstart import run_quickstart

    run_quickstart(out, seed=seed)


@app.command("serve-reward")
def serve_reward_cmd(
    name: Annotated[str, typer.Argument(help="Reward to serve (any name of refrl.rewards.available()).")],
    options: Annotated[list[str] | None, typer.Argument(help="Reward options key=value, e.g. checkpoint=/models/dino device=cuda")] = None,
    port: Annotated[int, typer.Option(help="TCP port (0 = any free port, printed at start).", min=0, max=65535)] = 8500,
    host: Annotated[str, typer.Option(help="Listen address: 127.0.0.1 (this machine only) or this host's cluster-network address.")] = "127.0.0.1",
    max_body_mb: Annotated[float, typer.Option(help="Largest request body in MiB (413 beyond; clients split their requests to fit).")] = 64.0,
    max_pixels: Annotated[int, typer.Option(help="Largest image (and reference, target, mask) in pixels, height x width (413 beyond).")] = 1024 * 1024,
    max_batch: Annotated[int, typer.Option(help="Images per call of the reward; waiting requests of one image size are joined up to this.")] = 64,
    max_queue: Annotated[int, typer.Option(help="Requests held at once (received, waiting or scored); one more gets 503.")] = 16,
    max_connections: Annotated[int, typer.Option(help="Open connections; one more request gets 503.")] = 64,
    idle_timeout: Annotated[float, typer.Option(help="Seconds a connection may stay open without a complete request.")] = 5.0,
    read_timeout: Annotated[float, typer.Option(help="Seconds to receive one request's body (408 beyond).")] = 60.0,
) -> None:
    """Serve a reward over HTTP for `remote:NAME` rewards in training configs."""
    from refrl.errors import RefrlError
    from refrl.rewards.zoo.remote import parse_options
    from refrl.rewards.zoo.serve import ServerLimits, serve_reward

    if not 0 < max_body_mb < 2**40:  # NaN and inf fail too, before int() would raise
        raise RefrlError(f"serve-reward: --max-body-mb must be a number > 0, got {max_body_mb}")
    limits = ServerLimits(max_body_bytes=int(max_body_mb * 2**20), max_pixels=max_pixels, max_batch=max_batch,
                          max_queue=max_queue, max_connections=max_connections, idle_timeout=idle_timeout,
                          read_timeout=read_timeout)
    serve_reward(name, parse_options(options or []), host=host, port=port, limits=limits,
                 announce=lambda m: typer.echo(m))


@app.command("eval")
def eval_cmd(
    overrides: OverridesArg = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML preset (e.g. configs/eval-refworld.yaml).")] = None,
    ckpt: Annotated[str | None, typer.Option(help="tiny-sft, a run folder or a checkpoint folder (or ckpt= in the config).")] = None,
    suite: Annotated[str | None, typer.Option(help="refworld | omniref | dreambench | refine (or suite= in the config)")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (images/ cache, eval.json, samples.jsonl, grid.png).", **OUT_DIR)] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples.", min=1)] = None,
    n: Annotated[int | None, typer.Option(help="refworld/refine: number of samples (default 96 / 48).", min=1)] = None,
    data: Annotated[Path | None, typer.Option(help="omniref: metadata JSON; dreambench: the DreamBench folder.")] = None,
    root: Annotated[Path | None, typer.Option(help="omniref: folder the image paths are relative to.")] = None,
    rewards: Annotated[str | None, typer.Option(help="Metrics, comma-separated NAME or METRIC=REWARD (default: the suite's).")] = None,
    reward_option: Annotated[list[str] | None, typer.Option(help="METRIC.KEY=VALUE, repeatable, e.g. dino.checkpoint=/models/dino")] = None,
    steps: Annotated[int | None, typer.Option(help="ODE steps (default 20).", min=1)] = None,
    cfg: Annotated[float | None, typer.Option("--cfg", help="Classifier-free guidance scale (1 = off; default 2).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the samples (refworld) and of the noise (default 0).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per generation / scoring batch (default 16).", min=1)] = None,
    force: Annotated[bool, typer.Option(help="Delete images generated with other settings and start over.")] = False,
    split: Annotated[str | None, typer.Option(help="refworld: train | val | test (default test: unseen identities).")] = None,
    level: Annotated[int | None, typer.Option(help="refworld: difficulty 0-2 (default 2).", min=0, max=2)] = None,
) -> None:
    """Generate (cached: an interrupted eval resumes) and score a suite; writes OUT/eval.json.

    Every flag is an override of the config (`EvalConfig`): `refrl eval -c configs/eval-refworld.yaml
    --ckpt runs/grpo --out runs/grpo/eval steps=40`."""
    from refrl.eval.config import evaluate, load_eval_config

    flags = {"ckpt": ckpt, "suite": suite, "limit": limit, "n": n, "data": data, "root": root, "rewards": rewards,
             "steps": steps, "cfg": cfg, "seed": seed, "batch_size": batch_size, "split": split, "level": level,
             "force": force or None}
    eval_cfg = load_eval_config(config, list(overrides or []), flags, reward_option or [])
    if out is None:
        fail("Missing option '--out'")
    res = evaluate(eval_cfg, out)
    overall = res["metrics"]["overall"]
    summary = ", ".join(f"{k} {v['mean']:.4g}" for k, v in overall.items() if isinstance(v, dict) and v["n"])
    typer.echo(f"{res['suite']}: {res['n_images']} images ({res['generated']} generated); {summary}")
    typer.echo(f"wrote {out / 'eval.json'}")


@app.command("report")
def report_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folder(s); several: one page overlaying them.")],
    out: Annotated[Path | None, typer.Option(help="Output file (default RUN_DIR/report.html; several runs: "
                                             "report-overlay.html in their common parent).", dir_okay=False, writable=True)] = None,
    smooth: Annotated[int, typer.Option(help="Several runs: moving average over this many iterations.")] = 10,
) -> None:
    """Write a self-contained report.html (curves, before/after tables, score vs #references, grids);
    given several runs, their reward curves against rollouts and their evaluations side by side."""
    from refrl.eval.overlay import write_overlay_report
    from refrl.eval.report import write_report

    path = write_report(run_dirs[0], out) if len(run_dirs) == 1 else write_overlay_report(run_dirs, out, smooth=smooth)
    typer.echo(f"wrote {path}")


@app.command("ablate")
def ablate(
    preset: Annotated[str, typer.Option(help="refworld")] = "refworld",
    out: Annotated[Path, typer.Option(help="Output folder (ablation.json, ablation.md, one run per variant).", **OUT_DIR)] = Path("runs/ablation"),
    quick: Annotated[bool, typer.Option(help="Small budget (about 10 minutes on 2 cores).")] = False,
    seeds: Annotated[int | None, typer.Option(help="Seeds per GRPO variant (default 3; 1 with --quick).", min=1)] = None,
    variants: Annotated[str | None, typer.Option(help="Comma-separated subset of variants.")] = None,
    ckpt: Annotated[str, typer.Option(help="SFT checkpoint every variant starts from.")] = "tiny-sft",
    workers: Annotated[int, typer.Option(help="Runs at once, in separate processes sharing the CPU cores "
                                         "(on a CPU machine, its core count is fastest).", min=1)] = 1,
    eval_n: Annotated[int | None, typer.Option(help="Test samples per evaluation (default 192; 48 with --quick). "
                                               "Runs already trained are only re-evaluated.", min=1)] = None,
    frozen: Annotated[str | None, typer.Option(help="Comma-separated modules kept at the checkpoint's weights "
                                               "(model.frozen; default: the recipe's, head). '' trains every "
                                               "module, as a LoRA checkpoint needs.")] = None,
) -> None:
    """Equal-budget ablation of the shaping methods (SARS/TDW, DRS/DAR, patch reward) on RefWorld."""
    from refrl.ablation import run_ablation

    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    n_seeds = seeds if seeds is not None else (1 if quick else 3)
    frozen_modules = None if frozen is None else [m.strip() for m in frozen.split(",") if m.strip()]
    path = run_ablation(out, preset=preset, quick=quick, seeds=n_seeds, variants=names, ckpt=ckpt,
                        workers=workers, eval_n=eval_n, frozen=frozen_modules)
    typer.echo(f"wrote {path} and {path.with_suffix('.md')}")


# --------------------------------------------------------------------------- entry point


def _click_exception_types() -> tuple[type[Exception], ...]:
    """The exception base of the click that typer runs on: recent typers (0.29 here) bundle
    their own copy (typer._click, whose ClickException derives from typer.TyperException),
    older ones raise click's own classes, which `except click.ClickException` alone misses
    in the first case and `typer.TyperException` alone in the second."""
    types: list[type[Exception]] = []
    if hasattr(typer, "TyperException"):
        types.append(typer.TyperException)
    click = sys.modules.get("click")
    if click is not None:
        types.append(click.ClickException)
    return tuple(types)


def _usage_error_line(exc: Exception) -> str:
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return its exit code; every
    failure has printed exactly one ``error:`` line on stderr."""
    from refrl.errors import RefrlError

    try:
        # standalone_mode=False: typer returns the code of `typer.Exit` and raises everything
        # else here, so there is one place that turns errors into one line and an exit code.
        code = app(args=argv, prog_name="refrl", standalone_mode=False)
    except RefrlError as exc:
        print_error(str(exc))
        return EXIT_USER_ERROR
    except typer.Abort:
        print_error("aborted")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        return EXIT_INTERRUPTED
    except MemoryError:
        print_error("out of memory")
        return EXIT_FAILURE
    except OSError as exc:  # the system refused: disk full, I/O error, a file vanished
        where = f": {exc.filename}" if exc.filename else ""
        print_error(f"{exc.strerror or exc}{where}")
        return EXIT_FAILURE
    except Exception as exc:
        if not isinstance(exc, _click_exception_types()):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # `refrl` or `refrl data` alone: the help
            exc.show()
        else:
            print_error(_usage_error_line(exc))
        return int(getattr(exc, "exit_code", EXIT_USER_ERROR))
    return code if isinstance(code, int) else 0


def main() -> None:
    """Console entry point (``refrl``, ``python -m refrl``)."""
    sys.exit(run())


if __name__ == "__main__":
    main()
