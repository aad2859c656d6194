"""The ``refrl`` command line: one typer app.

Imports of heavy modules happen inside commands so ``refrl --help`` is instant.
Every error, from typer (bad or missing options) or from refrl (``RefrlError``), is
printed by `run` as one line ``error: ...`` on stderr with a non-zero exit code.
"""

from __future__ import annotations

import errno
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="refrl",
    help="Train and evaluate reference-guided image generators: SFT, then RL (GRPO, DiffusionNFT, AWM) "
    "with reward shaping.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: generate RefWorld, validate manifests, import other layouts.", no_args_is_help=True)
app.add_typer(data_app, name="data")
weights_app = typer.Typer(help="Weights a config needs: list them (present or missing here), download them ahead.",
                          no_args_is_help=True)
app.add_typer(weights_app, name="weights")

EXIT_USER_ERROR = 2  # bad options, config, data or paths: the user can fix it
EXIT_FAILURE = 1  # the system failed the command: out of memory, disk full, I/O errors
EXIT_INTERRUPTED = 130

# Output folders: a file in their place is refused while parsing the options; a folder
# that cannot be created or written, by `refrl.runfolder.files.prepare_out_dir` before any work.
OUT_DIR = {"file_okay": False, "writable": True}
# What every seeded RNG accepts (the config keys `seed` have the same range: refrl.limits.SEED_MAX).
SEED = {"min": 0, "max": 2**32 - 1}


# Every character that ends a line somewhere (\r, U+2028, ...: what str.splitlines splits at), and
# other control characters, which are shown escaped: an error stays one line in any terminal or log.
_LINE_BREAKS = re.compile(r"[\t\n\v\f\r\x1c-\x1e\x85\u2028\u2029]+")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]")
MAX_ERROR_CHARS = 2000  # inputs are quoted cut already (refrl.errors.quote); this bounds the rest


def print_error(message: str) -> None:
    """The one line every failing command ends with (line breaks folded: one error, one line;
    at most `MAX_ERROR_CHARS` characters)."""
    from refrl.errors import clip_text

    text = _LINE_BREAKS.sub(" ", str(message))
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text).strip()
    typer.secho(f"error: {clip_text(text, MAX_ERROR_CHARS)}", err=True, fg=typer.colors.RED)


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """Print one readable error line and exit."""
    print_error(message)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- data


@data_app.command("refworld")
def data_refworld(
    out: Annotated[Path, typer.Option(help="Output folder (manifest <split>.jsonl + PNGs).", **OUT_DIR)],
    n: Annotated[int, typer.Option(help="Number of samples.", min=1)] = 200,
    seed: Annotated[int, typer.Option(help="Seed; sample i depends only on (seed, i).", **SEED)] = 0,
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

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="A preset's name (`refrl configs` lists them) or a YAML file.")]
OverridesArg = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. optim.lr=1e-4")]
RunDirOpt = Annotated[Path | None, typer.Option(help="Run folder (default runs/<config name>).", **OUT_DIR)]
# The sampler keys of eval / generate / compare (sampling.steps, sampling.cfg_scale, sampling.shift);
# unset: the model's (docs/guides/evaluation.md). The old flags stay hidden, to fail naming the new ones.
SamplingStepsOpt = Annotated[int | None, typer.Option("--sampling-steps", help="Sampler (ODE) steps; sampling.steps (default: the model's).", min=1)]
CfgScaleOpt = Annotated[float | None, typer.Option("--cfg-scale", help="Classifier-free guidance scale, 1 = off; sampling.cfg_scale (default: the model's).", min=0)]
ShiftOpt = Annotated[float | None, typer.Option("--shift", help="Time shift of the sigma schedule; sampling.shift (default: the model's).")]
OldStepsOpt = Annotated[str | None, typer.Option("--steps", hidden=True)]
OldCfgOpt = Annotated[str | None, typer.Option("--cfg", hidden=True)]
SamplerOverridesArg = Annotated[list[str] | None, typer.Argument(help="sampling.KEY=VALUE overrides, e.g. sampling.shift=3")]


def reject_old_sampler_flags(steps: str | None, cfg: str | None) -> None:
    """The flags renamed to --sampling-steps / --cfg-scale: one error line naming the new one."""
    from refrl.sampling.settings import renamed_flag_error

    for flag, value in (("--steps", steps), ("--cfg", cfg)):
        if value is not None:
            fail(renamed_flag_error(flag))


@app.command("sft")
def sft(
    config: ConfigOpt = "tiny-cpu-sft",
    overrides: OverridesArg = None,
    out: RunDirOpt = None,
    steps: Annotated[int | None, typer.Option(help="Override the number of steps.", min=1)] = None,
    seed: Annotated[int | None, typer.Option(help="Override the seed.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's latest checkpoint.")] = False,
) -> None:
    """Stage 1: supervised fine-tuning (rectified-flow loss) of a policy."""
    from refrl.config import read_config

    extra = list(overrides or [])
    if steps is not None:
        extra.append(f"steps={steps}")
    if seed is not None:
        extra.append(f"seed={seed}")
    read_config(config, extra)  # hostile YAML is refused before torch is imported (docs/guides/reliability.md)
    from refrl.train.sft import SFTConfig, train_sft
    from refrl.twin import (
        load_config,  # the config, with tiny_twin=true applied (docs/guides/presets.md)
    )

    cfg = load_config(SFTConfig, config, extra)
    out = out or Path("runs") / Path(config).stem
    path = train_sft(cfg, out, resume=resume)
    typer.echo(f"checkpoint: {path}")


@app.command("grpo", hidden=True, help="Alias of `refrl rl` (objective: grpo | nft | awm in the config).")
@app.command("rl")
def rl(
    config: ConfigOpt = "tiny-cpu-grpo",
    overrides: OverridesArg = None,
    out: RunDirOpt = None,
    iterations: Annotated[int | None, typer.Option(help="Override the number of iterations.", min=1)] = None,
    seed: Annotated[int | None, typer.Option(help="Override the seed.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's latest checkpoint.")] = False,
) -> None:
    """Stage 2: RL (objective grpo | nft | awm) with reward shaping (group norm, GDPO, SARS/TDW, DRS/DAR); works with accelerate launch."""
    from refrl.config import read_config

    extra = list(overrides or [])
    if iterations is not None:
        extra.append(f"iterations={iterations}")
    if seed is not None:
        extra.append(f"seed={seed}")
    read_config(config, extra)  # hostile YAML is refused before torch is imported (docs/guides/reliability.md)
    from refrl.train.grpo import train_grpo
    from refrl.train.grpo_config import GRPOConfig
    from refrl.twin import (
        load_config,  # the config, with tiny_twin=true applied (docs/guides/presets.md)
    )

    cfg = load_config(GRPOConfig, config, extra)
    out = out or Path("runs") / Path(config).stem
    path = train_grpo(cfg, out, resume=resume)
    typer.echo(f"checkpoint: {path}")


@app.command("generate")
def generate_cmd(
    ckpt: Annotated[str, typer.Option(help="tiny-sft, a run folder or a checkpoint folder.")],
    manifest: Annotated[Path, typer.Option(help="JSONL manifest of samples to generate for.")],
    out: Annotated[Path, typer.Option(help="Output folder (<id>.png per sample, grid.png).", **OUT_DIR)],
    overrides: SamplerOverridesArg = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples.", min=1)] = None,
    sampling_steps: SamplingStepsOpt = None,
    cfg_scale: CfgScaleOpt = None,
    shift: ShiftOpt = None,
    seed: Annotated[int, typer.Option(help="Seed; sample i uses noise (seed, i).", **SEED)] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per generation batch (under accelerate launch: batch k on process k mod N).", min=1)] = 32,
    steps: OldStepsOpt = None,
    cfg: OldCfgOpt = None,
) -> None:
    """ODE sampling with classifier-free guidance; writes PNGs and grid.png (refs -> output -> target).
    Works with accelerate launch (the samples are split across the processes)."""
    from refrl.data.manifest import load_manifest
    from refrl.eval.processes import processes_closed
    from refrl.generate import generate
    from refrl.sampling.settings import sampler_config

    reject_old_sampler_flags(steps, cfg)
    sampler = sampler_config(list(overrides or []), {"steps": sampling_steps, "cfg_scale": cfg_scale, "shift": shift},
                             "generate")
    samples = load_manifest(manifest)
    if limit is not None:
        samples = samples[:limit]
    with processes_closed() as procs:
        paths = generate(ckpt, samples, out, steps=sampler.steps, cfg_scale=sampler.cfg_scale, shift=sampler.shift,
                         seed=seed, batch_size=batch_size, processes=procs)
    if procs.is_main:
        typer.echo(f"wrote {len(paths)} images and {out / 'grid.png'}")


@app.command("compare")
def compare_cmd(
    ckpt: Annotated[list[str], typer.Option(help="Checkpoints, in column order (repeat: --ckpt tiny-sft --ckpt runs/grpo).")],
    out: Annotated[Path, typer.Option(help="Output PNG.")],
    overrides: SamplerOverridesArg = None,
    label: Annotated[list[str] | None, typer.Option(help="Column titles, one per --ckpt (default: folder names).")] = None,
    n: Annotated[int, typer.Option(help="Samples (rows).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the samples and of the noise (as refrl eval).", **SEED)] = 0,
    split: Annotated[str, typer.Option(help="RefWorld split (test: unseen subjects).")] = "test",
    level: Annotated[int, typer.Option(help="RefWorld difficulty 0-2.")] = 2,
    sampling_steps: SamplingStepsOpt = None,
    cfg_scale: CfgScaleOpt = None,
    shift: ShiftOpt = None,
    steps: OldStepsOpt = None,
    cfg: OldCfgOpt = None,
) -> None:
    """The same RefWorld samples and noise drawn by each checkpoint, side by side (before/after RL)."""
    from refrl.eval.compare import compare_grid
    from refrl.sampling.settings import sampler_config

    reject_old_sampler_flags(steps, cfg)
    sampler = sampler_config(list(overrides or []), {"steps": sampling_steps, "cfg_scale": cfg_scale, "shift": shift},
                             "compare")
    path = compare_grid(ckpt, out, labels=label, n=n, seed=seed, split=split, level=level, steps=sampler.steps,
                        cfg_scale=sampler.cfg_scale, shift=sampler.shift)
    typer.echo(f"wrote {path}")


# --------------------------------------------------------------------------- quickstart


@app.command("quickstart")
def quickstart(
    out: Annotated[Path, typer.Option(help="Run folder.", **OUT_DIR)] = Path("runs/quickstart"),
    seed: Annotated[int, typer.Option(help="Seed.", **SEED)] = 0,
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
    queue_timeout: Annotated[float, typer.Option(help="Seconds a received request may wait for its scoring to start (503 beyond).")] = 30.0,
) -> None:
    """Serve a reward over HTTP for `remote:NAME` rewards in training configs."""
    from refrl.errors import RefrlError
    from refrl.rewards.zoo.remote import parse_options
    from refrl.rewards.zoo.serve import ServerLimits, serve_reward

    if not 0 < max_body_mb < 2**40:  # NaN and inf fail too, before int() would raise
        raise RefrlError(f"serve-reward: --max-body-mb must be a number > 0, got {max_body_mb}")
    limits = ServerLimits(max_body_bytes=int(max_body_mb * 2**20), max_pixels=max_pixels, max_batch=max_batch,
                          max_queue=max_queue, max_connections=max_connections, idle_timeout=idle_timeout,
                          read_timeout=read_timeout, queue_timeout=queue_timeout)
    serve_reward(name, parse_options(options or []), host=host, port=port, limits=limits,
                 announce=lambda m: typer.echo(m))


@app.command("eval")
def eval_cmd(
    overrides: OverridesArg = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="A preset's name (e.g. eval-refworld) or a YAML file.")] = None,
    ckpt: Annotated[str | None, typer.Option(help="tiny-sft, a run folder or a checkpoint folder (or ckpt= in the config).")] = None,
    suite: Annotated[str | None, typer.Option(help="refworld | manifest | omniref | dreambench | refine (or suite= in the config)")] = None,
    # required: `...` keeps the option after the defaulted ones and makes click mark it required
    out: Annotated[Path, typer.Option(help="Output folder (images/ cache, eval.json, samples.jsonl, grid.png).", **OUT_DIR)] = ...,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples.", min=1)] = None,
    n: Annotated[int | None, typer.Option(help="refworld/refine: number of samples (default 96 / 48).", min=1)] = None,
    data: Annotated[Path | None, typer.Option(help="manifest: a JSONL manifest; omniref: metadata JSON; dreambench: the DreamBench folder.")] = None,
    root: Annotated[Path | None, typer.Option(help="omniref: folder the image paths are relative to.")] = None,
    rewards: Annotated[str | None, typer.Option(help="Metrics, comma-separated NAME or METRIC=REWARD (default: the suite's).")] = None,
    reward_option: Annotated[list[str] | None, typer.Option(help="METRIC.KEY=VALUE, repeatable, e.g. dino.checkpoint=/models/dino")] = None,
    sampling_steps: SamplingStepsOpt = None,
    cfg_scale: CfgScaleOpt = None,
    shift: ShiftOpt = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the samples (refworld) and of the noise (default 0).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per generation / scoring batch (default 16).", min=1)] = None,
    force: Annotated[bool, typer.Option(help="Delete images generated with other settings and start over.")] = False,
    split: Annotated[str | None, typer.Option(help="refworld: train | val | test (default test: unseen identities).")] = None,
    level: Annotated[int | None, typer.Option(help="refworld: difficulty 0-2 (default 2).", min=0, max=2)] = None,
    steps: OldStepsOpt = None,
    cfg: OldCfgOpt = None,
) -> None:
    """Generate (cached: an interrupted eval resumes) and score a suite; writes OUT/eval.json.

    Every flag is an override of the config (`EvalConfig`): `refrl eval -c configs/eval-refworld.yaml
    --ckpt runs/grpo --out runs/grpo/eval sampling.steps=40`. Works with accelerate launch (the
    images are split across the processes; the same eval.json as one process)."""
    from refrl.eval.config import evaluate, load_eval_config
    from refrl.eval.processes import processes_closed
    from refrl.eval.summary import summary_lines

    reject_old_sampler_flags(steps, cfg)
    flags = {"ckpt": ckpt, "suite": suite, "limit": limit, "n": n, "data": data, "root": root, "rewards": rewards,
             "sampling.steps": sampling_steps, "sampling.cfg_scale": cfg_scale, "sampling.shift": shift,
             "seed": seed, "batch_size": batch_size, "split": split, "level": level, "force": force or None}
    eval_cfg = load_eval_config(config, list(overrides or []), flags, reward_option or [])
    with processes_closed() as procs:
        res = evaluate(eval_cfg, out, processes=procs)
    if procs.is_main:
        for line in summary_lines(res):
            typer.echo(line)
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


WeightsConfigOpt = Annotated[str, typer.Option("--config", "-c", help="A preset's name or a YAML file (training or eval).")]


@weights_app.command("list")
def weights_list(
    config: WeightsConfigOpt,
    overrides: OverridesArg = None,
    cache: Annotated[Path | None, typer.Option(help="A Hugging Face cache folder (default: HF_HUB_CACHE).", file_okay=False)] = None,
) -> None:
    """Every weight folder the config loads: hub id@revision, files, size (where known), present or missing. Offline."""
    from refrl.weights import list_rows

    rows = list_rows(config, list(overrides or []), cache)
    widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else []
    for row in rows:
        typer.echo("  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=False)) + "  " + row[4])
    missing = sum(r[4] == "missing" for r in rows)
    typer.echo(f"{len(rows)} weight folders, {missing} missing" + (
        f": fetch them where there is network with `refrl weights download --config {config}`" if missing else ""))


@weights_app.command("download")
def weights_download(
    config: WeightsConfigOpt,
    overrides: OverridesArg = None,
    to: Annotated[Path | None, typer.Option(help="Download into this folder (a Hugging Face cache of its own) "
                                            "instead of HF_HUB_CACHE.", **OUT_DIR)] = None,
) -> None:
    """Fetch the config's hub weights (huggingface_hub) into the cache or --to; for a login node with internet."""
    from refrl.weights import download_all

    download_all(config, list(overrides or []), to, echo=typer.echo)
    if to is not None:
        typer.echo(f"done; copy {to} to the machines without internet and set HF_HUB_CACHE={to} there "
                   "(docs/guides/offline-weights.md)")


@app.command("configs")
def configs_cmd() -> None:
    """List the shipped presets (give a name to --config from any folder), one line each."""
    from refrl.presets import preset_names, preset_path, preset_summary

    names = preset_names()
    width = max(map(len, names), default=0)
    for name in names:
        typer.echo(f"{name:<{width}}  {preset_summary(preset_path(name))}")


@app.command("plan")
def plan_cmd(
    config: Annotated[str, typer.Option("--config", "-c", help="A preset's name or a YAML file (SFT or RL).")],
    overrides: OverridesArg = None,
    gpus: Annotated[int, typer.Option(help="GPUs (processes) the run will use.", min=1, max=100_000)] = 1,
    gpu_memory: Annotated[float, typer.Option("--gpu-memory", help="Memory of one GPU, GiB.", min=0.1, max=1e6)] = 80.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Memory per GPU of a training config, for data-parallel and FSDP2, full and LoRA (docs/guides/memory-plan.md)."""
    import json

    from refrl.plan.report import plan_config, render

    plan = plan_config(config, list(overrides or []), gpus, gpu_memory)
    typer.echo(json.dumps(plan, indent=2) if json_out else render(plan))


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
        return exc.exit_code  # 2: the input; 1: the run failed (refrl.errors.RunFailure)
    except typer.Abort:
        print_error("aborted")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as exc:  # a training run says where it stopped and how to resume
        print_error(str(exc) or "interrupted")
        return EXIT_INTERRUPTED
    except MemoryError:
        print_error("out of memory")
        return EXIT_FAILURE
    except OSError as exc:  # the system refused: disk full, I/O error, a file vanished
        where = f": {exc.filename}" if exc.filename else ""
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # a path the user chose is not writable
            print_error(f"{exc.strerror}{where} (choose a path you can write, e.g. another --out)")
            return EXIT_USER_ERROR
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
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C outside a training loop into 130, silently
        print_error("interrupted")
    return code if isinstance(code, int) else 0


def main() -> None:
    """Console entry point (``refrl``, ``python -m refrl``)."""
    sys.exit(run())


if __name__ == "__main__":
    main()
