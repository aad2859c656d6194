"""Load a training config, plan it (`refrl.plan.memory`) and print the plan."""

from __future__ import annotations

from typing import Any

from refrl.plan.memory import GIB, HEADROOM, make_plan

RL_KEYS = ("iterations", "objective", "group_size", "groups_per_iteration", "minibatch_size", "rewards", "sampling")
ROWS = ("weights", "gradients", "optimizer", "ema", "kl_reference", "gathered_units", "activations",
        "rollout_buffers", "text_encoder", "vae")


def load_training_config(config: str, overrides: list[str]) -> tuple[Any, bool]:
    """(config, is_rl): an RL config has RL keys, else it is an SFT config."""
    from refrl.config import read_config
    from refrl.twin import load_config

    raw = read_config(config, overrides)
    rl = any(k in raw for k in RL_KEYS)
    if rl:
        from refrl.train.grpo_config import GRPOConfig

        return load_config(GRPOConfig, config, overrides), True
    from refrl.train.sft import SFTConfig

    return load_config(SFTConfig, config, overrides), False


def plan_config(config: str, overrides: list[str], gpus: int, gpu_memory_gib: float) -> dict[str, Any]:
    from refrl.plan.specs import model_spec

    cfg, rl = load_training_config(config, overrides)
    return make_plan(cfg, model_spec(cfg.model, cfg.data), gpus, gpu_memory_gib, rl)


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f}"


def render(plan: dict[str, Any]) -> str:
    cols = plan["columns"]
    head = ["GiB per GPU"] + [f"{c['strategy']} {c['finetune']}" for c in cols]
    lines = [f"model: {plan['model']}   GPUs: {plan['gpus']} x {plan['gpu_memory_gib']:g} GiB   micro-batch per GPU: "
             f"{plan['micro_batch']}   gradient checkpointing: {'on' if plan['gradient_checkpointing'] else 'off'}"]
    rows = [head]
    for key in ROWS:
        if all(key not in c["bytes"] for c in cols):
            continue
        unknown = key in plan["unknown"]
        rows.append([key.replace("_", " ")] + ["?" if unknown else gib(c["bytes"].get(key, 0)) for c in cols])
    rows.append(["activations, no checkpointing"] + [gib(c["activations_no_checkpointing"]) for c in cols])
    rows.append(["activations, checkpointing"] + [gib(c["activations_checkpointing"]) for c in cols])
    rows.append(["total"] + [gib(c["total"]) for c in cols])
    rows.append(["fits"] + ["yes" if c["fits"] else "no" for c in cols])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
              for r in rows]
    if plan["unknown"]:
        lines.append(f"?: not counted, no local pipeline folder to read them from ({', '.join(plan['unknown'])})")
    cur = plan["config_column"]
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"this config ({cur['strategy']}, {cur['finetune']}): {gib(cur['total'])} GiB per GPU, {verdict} in "
                 f"{HEADROOM:.0%} of {plan['gpu_memory_gib']:g} GiB")
    if plan["advice"]:
        lines.append(f"to fit: {plan['advice']}")
    return "\n".join(lines)
