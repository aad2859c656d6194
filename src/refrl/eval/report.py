"""``refrl report RUN_DIR``: one self-contained ``report.html`` for a run folder.

What it reads (whatever is present; nothing is required but something to show):

* ``config.yaml`` (and ``*/config.yaml`` of sub-runs such as ``sft/`` and ``grpo/``);
* ``metrics.jsonl`` (and ``*/metrics.jsonl``): curves of every ``reward/*`` key, loss,
  KL, PPO ratio statistics, clip fraction, gradient norm;
* ``eval.json`` files up to two folders deep (``eval_before/``, ``eval_after/``,
  ``eval/``...): a before/after table per metric, score vs number of references
  (the OmniRef-Bench headline plot), per-category tables and curves from the
  evaluation's ``samples.jsonl``;
* ``grids/*.png`` and each evaluation's ``grid.png``; when a ``before``/``sft`` and an
  ``after``/``rl``/``grpo`` evaluation of an embedded suite share a seed, the
  before/after grid (references -> SFT output -> RL output -> target) is made;
* ``ablation.json`` / ``ablation.md``.

Images are embedded as base64 PNG, so the file can be mailed or archived alone. No
JavaScript: the page is static HTML + CSS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from refrl.errors import RefrlError
from refrl.eval import plots
from refrl.eval.grid import sample_row, save_grid
from refrl.eval.html import FLOAT_DIGITS, _e, _fmt, _img, _table, html_page
from refrl.eval.validation_report import VALIDATION_DIR, split_records, validation_html
from refrl.limits import load_yaml

REPORT_FILE = "report.html"
GRIDS_DIR = "grids"
BEFORE_AFTER_FILE = "before_after.png"
BEFORE_AFTER_ROWS = 8
EVAL_SEARCH_DEPTH = 2
BEFORE_WORDS = ("before", "sft", "base")
AFTER_WORDS = ("after", "rl", "grpo")
MAX_CATEGORY_CURVES = 1  # evaluations that get a per-category plot (the last ones)



# --------------------------------------------------------------------------- before/after grid


def before_after_grid(samples: Sequence[Any], sft_images: Sequence[torch.Tensor] | torch.Tensor,
                      rl_images: Sequence[torch.Tensor] | torch.Tensor, path: str | os.PathLike) -> Path:
    """One row per sample: its references -> SFT output -> RL output -> target (when known)."""
    if not (len(samples) == len(sft_images) == len(rl_images)):
        raise ValueError(f"before_after_grid: {len(samples)} samples, {len(sft_images)} SFT and "
                         f"{len(rl_images)} RL images; expected one of each per sample")
    rows = [sample_row(s, [("SFT", before), ("RL", after)], s.target)
            for s, before, after in zip(samples, sft_images, rl_images, strict=True)]
    return save_grid(rows, path)


# --------------------------------------------------------------------------- reading a run folder


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RefrlError(f"cannot read {path}: {e}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RefrlError(f"{path}:{n}: bad JSON ({e.msg})") from None
    return out


def _label(run_dir: Path, folder: Path) -> str:
    rel = folder.relative_to(run_dir).as_posix()
    return "run" if rel == "." else rel


def _order(label: str) -> tuple[int, str]:
    words = label.lower().replace("/", "_").replace("-", "_").split("_")
    if any(w in BEFORE_WORDS for w in words):
        return (0, label)
    if any(w in AFTER_WORDS for w in words):
        return (2, label)
    return (1, label)


def find_files(run_dir: Path, name: str, depth: int = 1) -> dict[str, Path]:
    """``name`` in ``run_dir`` and its sub-folders up to ``depth`` levels, keyed by folder label."""
    found = {}
    for level in range(depth + 1):
        for p in sorted(run_dir.glob("/".join(["*"] * level + [name]))):
            if p.is_file():
                found[_label(run_dir, p.parent)] = p
    return dict(sorted(found.items(), key=lambda kv: _order(kv[0])))


def find_evals(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every ``eval.json`` up to two folders deep, keyed by folder label, before-ish first."""
    run_dir = Path(run_dir)
    out = {}
    for label, path in find_files(run_dir, "eval.json", EVAL_SEARCH_DEPTH).items():
        if label.split("/")[-2:-1] == [VALIDATION_DIR]:  # validation during training: drawn as curves
            continue
        ev = _read_json(path)
        if isinstance(ev, dict) and "metrics" in ev:
            ev["_dir"] = str(path.parent)
            out[label] = ev
    return out


# --------------------------------------------------------------------------- HTML pieces


def describe_run(config: Mapping[str, Any]) -> str:
    """One sentence saying what a run did, from its resolved config."""
    model = config.get("model") or {}
    init = model.get("init") or "a fresh model"
    if "iterations" in config:
        rewards = ", ".join(f"{r.get('name')} (w={r.get('weight', 1.0)})" for r in config.get("rewards") or [])
        adv = (config.get("advantage") or {}).get("kind", "group norm")
        samp = config.get("sampling") or {}
        objective = str(config.get("objective", "grpo")).upper()
        return (f"{objective}: {config['iterations']} iterations of {config.get('groups_per_iteration')} prompts x "
                f"{config.get('group_size')} samples from {init}; rewards {rewards or '–'}; advantage {adv}; "
                f"{samp.get('steps', '?')} rollout steps ({samp.get('sde_kind', '?')}, SDE steps: "
                f"{samp.get('sde_steps', '?')}); KL beta {config.get('beta_kl', 0)}.")
    if "steps" in config:
        return (f"SFT: {config['steps']} steps of batch {config.get('batch_size', '?')} from {init} "
                f"({model.get('kind', '?')}, width {model.get('width', '?')}, depth {model.get('depth', '?')}).")
    return "A run folder."


def _config_section(configs: Mapping[str, Path]) -> tuple[str, list[str]]:
    parts, sentences = [], []
    for label, path in configs.items():
        try:
            cfg = load_yaml(path.read_text(), str(path)) or {}  # bounded: no aliases (refrl.limits)
        except yaml.YAMLError as e:
            raise RefrlError(f"cannot read {path}: {e}") from None
        sentence = describe_run(cfg) if isinstance(cfg, dict) else "A run folder."
        sentences.append(f"<b>{_e(label)}</b>: {_e(sentence)}" if len(configs) > 1 else _e(sentence))
        scalars = [(k, v) for k, v in cfg.items() if not isinstance(v, dict | list)] if isinstance(cfg, dict) else []
        table = _table(["key", "value"], [[_e(k), _fmt(v)] for k, v in scalars], left=2) if scalars else ""
        parts.append(f"<h3>{_e(label)} — {_e(path.name)}</h3>{table}"
                     f"<details><summary>full config</summary><pre>{_e(path.read_text())}</pre></details>")
    return "".join(parts), sentences


def _metric_names(evals: Mapping[str, Mapping[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for ev in evals.values():
        for k, v in ev["metrics"].get("overall", {}).items():
            if isinstance(v, dict):
                names.setdefault(k, None)
    return list(names)


def _mean(ev: Mapping[str, Any], group: str, key: str | None, metric: str) -> float | None:
    node = ev["metrics"].get(group, {})
    node = node.get(key, {}) if key is not None else node
    return (node.get(metric) or {}).get("mean")


def _delta(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "–"
    d = b - a
    cls = "up" if d > 0 else "down" if d < 0 else ""
    return f'<span class="{cls}">{d:+.{FLOAT_DIGITS - 1}g}</span>'


def _sampler(ev: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """Steps, guidance and shift of an eval.json (``sampling``; top-level ``steps`` / ``cfg`` /
    ``shift`` in files written before the section existed)."""
    s = ev.get("sampling") or {}
    return (s.get("steps", ev.get("steps")), s.get("cfg_scale", ev.get("cfg")), s.get("shift", ev.get("shift")))


def _eval_tables(evals: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]) -> str:
    labels = list(evals)
    header = ["metric", *(_e(lb) for lb in labels)] + (["change"] if len(labels) > 1 else [])
    rows = []
    for m in metrics:
        vals = [_mean(ev, "overall", None, m) for ev in evals.values()]
        counts = [(ev["metrics"]["overall"].get(m) or {}).get("n", 0) for ev in evals.values()]
        cells = [f"{_fmt(v)} <span class='muted'>(n={c})</span>" for v, c in zip(vals, counts, strict=True)]
        rows.append([_e(m), *cells] + ([_delta(vals[0], vals[-1])] if len(labels) > 1 else []))
    info = _table(["evaluation", "suite", "checkpoint", "samples", "images", "steps", "cfg_scale", "shift", "seed"],
                  [[_e(lb), _e(ev.get("suite")), _e(ev.get("ckpt")), _fmt(ev.get("n")), _fmt(ev.get("n_images")),
                    *(_fmt(v) for v in _sampler(ev)), _fmt(ev.get("seed"))] for lb, ev in evals.items()],
                  left=3)
    parts = [info, "<h3>Mean score per metric</h3>", _table(header, rows)]
    categories = sorted({c for ev in evals.values() for c in ev["metrics"].get("by_category", {})})
    if categories:
        parts.append("<h3>Per category</h3>")
        for m in metrics:
            crow = []
            for c in categories:
                vals = [_mean(ev, "by_category", c, m) for ev in evals.values()]
                if all(v is None for v in vals):
                    continue
                crow.append([_e(c), *map(_fmt, vals)] + ([_delta(vals[0], vals[-1])] if len(labels) > 1 else []))
            if crow:
                parts.append(f"<div class='card'><b>{_e(m)}</b>" + _table(["category", *header[1:]], crow) + "</div>")
    return "".join(parts)


def _auto_before_after(run_dir: Path, evals: Mapping[str, Mapping[str, Any]]) -> Path | None:
    """The before/after grid of the first samples when a before and an after evaluation of one
    embedded suite (regenerable from its seed) share that seed."""
    from refrl.data.images import load_image
    from refrl.eval.refworld import refworld_suite
    from refrl.eval.runner import IMAGES_DIR

    befores = [lb for lb in evals if _order(lb)[0] == 0]
    afters = [lb for lb in evals if _order(lb)[0] == 2]
    if not befores or not afters:
        return None
    a, b = evals[befores[0]], evals[afters[-1]]
    params = a.get("params") or {}
    if a.get("suite") not in ("refworld", "refine") or any(a.get(k) != b.get(k) for k in ("suite", "params", "size")):
        return None
    n = min(BEFORE_AFTER_ROWS, int(a.get("n") or 0), int(b.get("n") or 0))
    if n < 1:
        return None
    suite = refworld_suite(n=n, seed=int(params.get("data_seed", a["seed"])), size=int((a.get("size") or [32])[0]),
                           level=int(params.get("level", 2)), categories=params.get("categories"),
                           name=str(a["suite"]))
    paths = [(Path(ev["_dir"]) / IMAGES_DIR / it.file_name) for ev in (a, b) for it in suite.items]
    if not all(p.is_file() for p in paths):
        return None
    before = [load_image(p) for p in paths[:n]]
    after = [load_image(p) for p in paths[n:]]
    return before_after_grid([it.sample for it in suite.items], before, after, run_dir / GRIDS_DIR / BEFORE_AFTER_FILE)


def _ablation_section(run_dir: Path) -> str:
    parts = []
    path = run_dir / "ablation.json"
    if path.is_file():
        data = _read_json(path)
        rows = list(data.values()) if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()) else data
        names = list(data) if isinstance(data, dict) else None
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], dict | list)))
            header = (["variant"] if names else []) + [_e(k) for k in keys]
            body = [([_e(names[i])] if names else []) + [_fmt(r.get(k)) for k in keys] for i, r in enumerate(rows)]
            parts.append(_table(header, body))
        else:
            parts.append(f"<pre>{_e(json.dumps(data, indent=2))}</pre>")
    md = run_dir / "ablation.md"
    if md.is_file():
        parts.append(_markdown(md.read_text()))
    return "".join(parts)


def _markdown(text: str) -> str:
    """The little markdown an ablation note uses: pipe tables, # headings, paragraphs."""
    out, table = [], []

    def flush() -> None:
        if table:
            cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
            body = [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append(_table([_e(c) for c in cells[0]], [[_e(c) for c in r] for r in body]))
            table.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            out.append(f"<h3>{_e(line.lstrip('#').strip())}</h3>")
        elif line.strip():
            out.append(f"<p>{_e(line)}</p>")
    flush()
    return "".join(out)


# --------------------------------------------------------------------------- the report


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``report.html`` for ``run_dir`` (or to ``out``) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RefrlError(f"run folder not found: {run_dir}")
    configs = find_files(run_dir, "config.yaml")
    metrics_files = find_files(run_dir, "metrics.jsonl")
    evals = find_evals(run_dir)
    ablation = _ablation_section(run_dir)
    if not (configs or metrics_files or evals or ablation):
        raise RefrlError(f"{run_dir} holds nothing to report: no config.yaml, metrics.jsonl, eval.json or ablation")

    config_html, sentences = _config_section(configs)
    sections: list[tuple[str, str, str]] = []  # (anchor, title, body)
    suites: dict[str, dict[str, dict[str, Any]]] = {}
    for label, ev in evals.items():
        suites.setdefault(str(ev.get("suite")), {})[label] = ev
    for suite, group in suites.items():
        metric_names = _metric_names(group)
        body = [f"<p class='muted'>{_e(next(iter(group.values())).get('protocol', ''))}</p>"]
        png = plots.score_vs_refs_png(group, metric_names)
        if png:
            body.append(_img(png, "score vs number of references"))
        body.append(_eval_tables(group, metric_names))
        for label, ev in list(group.items())[-MAX_CATEGORY_CURVES:]:
            samples = Path(ev["_dir"]) / "samples.jsonl"
            if samples.is_file():
                png = plots.category_vs_refs_png(_read_jsonl(samples), metric_names, f"{label}: per category")
                if png:
                    body.append(_img(png, f"{label} per category"))
        sections.append((f"eval-{suite}", f"Evaluation: {suite}", "".join(body)))
    grids: list[tuple[str, Path]] = []
    if evals:
        _auto_before_after(run_dir, evals)
    grid_dir = run_dir / GRIDS_DIR
    for p in sorted(grid_dir.glob("*.png")) if grid_dir.is_dir() else []:
        title = "before / after: references → SFT → RL → target" if p.name == BEFORE_AFTER_FILE else p.stem
        grids.append((title.replace("_", " "), p))
    grids.sort(key=lambda g: g[1].name != BEFORE_AFTER_FILE)
    for label, ev in evals.items():
        p = Path(ev["_dir"]) / "grid.png"
        if p.is_file():
            grids.append((f"{label}: references → output → target", p))
    if grids:
        body = "".join(f"<h3>{_e(t)}</h3>{_img(p.read_bytes(), t, 'grid')}" for t, p in grids)
        sections.append(("grids", "Samples", body))
    curves = []
    for label, path in metrics_files.items():
        records, val = split_records(_read_jsonl(path))  # training lines; validation lines (their own curves)
        png = plots.curves_png(records, title=f"{label}: {path.name} ({len(records)} records)")
        if png:
            curves.append(_img(png, f"{label} curves"))
        curves.append(validation_html(label, path.parent, val))
    if any(curves):
        sections.append(("curves", "Training curves", "".join(curves)))
    if ablation:
        sections.append(("ablation", "Ablation", ablation))
    if config_html:
        sections.append(("config", "Configuration", config_html))

    lead = "<br>".join(sentences) or "A run folder."
    page = html_page(f"refrl report: {run_dir.resolve().name}", lead, str(run_dir.resolve()), sections)
    out_path = Path(out) if out is not None else run_dir / REPORT_FILE
    from refrl.runfolder.files import atomic_write_text

    return atomic_write_text(out_path, page)
