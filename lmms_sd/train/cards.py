"""Model cards of the shipped shapes models, written from ``metrics.json`` so that every figure
in a card is the one measured by the recipe run.

    model_cards/shapes_<family>_<role>.md
"""
from __future__ import annotations

from pathlib import Path

FAMILY_NAMES = {"llava": "LLaVA", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL",
                "qwen3_vl": "Qwen3-VL", "llava_onevision": "LLaVA-OneVision"}
TEXT_LMS = {"llava": "Llama", "qwen2_vl": "Qwen2", "qwen2_5_vl": "Qwen2", "qwen3_vl": "Qwen3",
            "llava_onevision": "Qwen2"}


def _what(family: str, role: str, arch: dict) -> str:
    name = FAMILY_NAMES[family]
    lm = f"{arch['layers']}-layer, width-{arch['width']}, {arch['heads']}-head"
    if role == "target":
        vision = f"{arch['vision_layers']}-layer width-{arch['vision_width']} vision tower"
        return (f"A tiny {name} target VLM trained on the synthetic shapes task: a {vision} "
                f"and a {lm} language model.")
    if role == "draft_vlm":
        return (f"A draft VLM for the shapes {name} target: the same family, vision config and "
                f"processor (it accepts the target's inputs unchanged) with a {lm} language "
                f"model, distilled from the target.")
    return (f"A text-only draft for the shapes {name} target: a {lm} {TEXT_LMS[family]} LM "
            f"sharing the target's tokenizer. It sees the prompt with the image placeholders "
            f"removed, so it cannot know the image content; distilled from the target.")


def _objective(role: str) -> str:
    if role == "target":
        return "next-token cross-entropy on the answer tokens (prompt and padding masked)"
    return ("KL(target || draft) on the answer positions with teacher forcing (one target "
            "forward per batch, no generation)")


def _figures(family: str, role: str, entry: dict, k: int) -> list[str]:
    ev = entry["eval"]
    topics = ", ".join(f"{t} {v:.3f}" for t, v in ev["by_topic"].items())
    lines = [f"- content accuracy ({ev['n_items']} held-out items, greedy, `shapes.score`): "
             f"**{ev['content_accuracy']:.3f}** ({topics})"]
    if role == "text_only":
        lines[0] += " — answering without the image, so low by construction"
    spec = ev.get("speculative")
    if spec is not None:
        lines.append(f"- as the draft of the shapes {FAMILY_NAMES[family]} target, chain of "
                     f"k={spec['k']}, greedy: **tau {spec['tau']:.2f}** (tokens per target step),"
                     f" acceptance rate {spec['acceptance_rate']:.3f}; output identical to the "
                     f"target's greedy output on all {spec['n_items']} items")
    return lines


def _stage1(stage: dict | None) -> list[str]:
    """The target's first stage (questions of some topics only), when it had one."""
    if stage is None:
        return []
    opt = stage["optim"]
    return [f"- before that, stage 1 on the {' / '.join(stage['topics'])} questions only: "
            f"lr {opt['lr']}, {opt['warmup_steps']} warmup steps, {opt['steps']} steps x batch "
            f"{opt['batch_size']}, seed {opt['seed']}, final loss {stage['final_loss']:.4f}, "
            f"{stage['train_seconds'] / 60:.1f} min (it teaches the vision path colours, which "
            "training on every topic from the start left at chance)"]


def _later(entry: dict) -> list[str]:
    """A later stage of a trained role: the target deepened, or a draft continued."""
    if "deepen" in entry:
        d = entry["deepen"]
        opt, train = d["train"]["optim"], d["train"]
        return ["", "### Deepened", "",
                f"- then grown from {d['from_layers']} to {d['layers']} decoder layers (the real "
                f"model's depth): the trained layers at {d['trained_layers_at']}, the others "
                f"inserted as {d['inserted']}",
                f"- {opt['steps']} steps x batch {opt['batch_size']}, lr {opt['lr']}, "
                f"{opt['warmup_steps']} warmup steps, seed {opt['seed']}, final loss "
                f"{train['final_loss']:.4f}, {train['train_seconds'] / 60:.1f} min "
                f"({d['environment']['threads']} torch thread(s))",
                f"- command: `{d['command']}`"]
    if "continued" in entry:
        c = entry["continued"]
        opt, train = c["train"]["optim"], c["train"]
        return ["", "### Continued", "",
                f"- then distilled further against {c['against']} from these weights: "
                f"{opt['steps']} steps x batch {opt['batch_size']}, lr {opt['lr']}, final loss "
                f"{train['final_loss']:.4f}, {train['train_seconds'] / 60:.1f} min "
                f"({c['environment']['threads']} torch thread(s))",
                f"- command: `{c['command']}`"]
    return []


def model_card(metrics: dict, role: str) -> str:
    """The markdown card of one role of one family."""
    family, entry = metrics["family"], metrics["models"][role]
    arch, train = entry["architecture"], entry["train"]
    opt = train["optim"]
    lines = [
        f"# shapes {FAMILY_NAMES[family]} {role}", "",
        _what(family, role, arch), "",
        "Toy model for tests, the offline demo and speculative-decoding experiments; it knows "
        "only the shapes task (`lmms_sd.data.shapes`) and nothing of real images or language.",
        "", "## Use", "", "```python",
        "from lmms_sd.adapters import load_adapter",
        "from lmms_sd.assets import shipped_model",
        f"adapter = load_adapter(shipped_model({family!r}, {role!r}))", "```", "",
        "## Architecture", "",
        f"- parameters: {entry['parameters']:,} (language model incl. lm_head: "
        f"{entry['language_model_parameters']:,}); float32 safetensors",
        f"- knobs: `{arch}`",
    ]
    init = entry.get("init_from_target")
    if init is not None:
        lines.append(f"- initialised from the target: {init['vision_tensors_copied']} vision "
                     f"tensors copied; embeddings/lm_head copied: {init['embeddings_copied']} "
                     "(only when the widths match)")
    lines += [
        "", "## Training", "",
        "- data: fresh training-split shapes scenes every step (all four topics in turn), "
        "rendered through the chat template; the test split shares no scene",
        f"- objective: {_objective(role)}",
        f"- AdamW, lr {opt['lr']}, weight decay {opt['weight_decay']} (matrices), "
        f"{opt['warmup_steps']} warmup steps then cosine to {opt['min_lr_ratio']} x lr, "
        f"grad clip {opt['grad_clip']}, {opt['steps']} steps x batch {opt['batch_size']}, "
        f"seed {opt['seed']}"
        + (f", vision encoder + projector at {opt['vision_lr_scale']} x lr"
           if opt.get("vision_lr_scale", 1.0) != 1.0 else ""),
        f"- final training loss {train['final_loss']:.4f}; {train['train_seconds'] / 60:.1f} min "
        f"on a shared 2-core CPU ({entry['environment']['threads']} torch thread(s))",
        *_stage1(entry.get("stage1")),
        f"- command: `{entry['command']}`",
        *_later(entry),
        "", "## Measured", "",
        *_figures(family, role, entry, metrics["k"]),
        f"- evaluation items: {metrics['eval_items']}",
        f"- environment: torch {entry['environment']['torch']}, transformers "
        f"{entry['environment']['transformers']}", "",
    ]
    return "\n".join(lines)


def write_model_cards(metrics: dict, out_dir: Path) -> list[Path]:
    """Write one card per role present in ``metrics``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for role, entry in metrics["models"].items():
        if "architecture" not in entry or "eval" not in entry:
            continue  # a role another trainer manages
        path = out_dir / f"shapes_{metrics['family']}_{role}.md"
        path.write_text(model_card(metrics, role))
        paths.append(path)
    return paths
