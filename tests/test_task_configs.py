"""Every ``generate_until`` task config shipped with the pinned lmms-eval decodes, or is refused
for a reason that names the setting.

The configs are read with lmms-eval's own loader (``include:`` templates resolved, ``!function``
tags left unresolved) and the ``default`` model-specific generation kwargs merged in, as a task
object would. What each config *should* do is worked out here from transformers' rules, apart
from ``generation_config``:
  - greedy when ``do_sample`` is false, or when it is absent and temperature is 0 or absent;
    then temperature / top_p / top_k are ignored (transformers warns and ignores them);
  - refused: ``num_beams`` > 1, distribution-changing settings we do not implement at a
    non-neutral value, and ``do_sample: true`` with ``temperature: 0`` (transformers raises).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from lmms_sd.lmms_eval.args import generation_config

# not implemented, with their neutral values (independent of args.py's own table)
DISTRIBUTION_CHANGING = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0,
                         "min_length": 0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                         "length_penalty": 1.0, "typical_p": 1.0, "min_p": None,
                         "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def task_configs() -> dict[str, dict]:
    """task name -> generation kwargs, for every generate_until task config lmms-eval ships."""
    import lmms_eval
    from lmms_eval.utils import load_yaml_config

    out: dict[str, dict] = {}
    for path in sorted((Path(lmms_eval.__file__).parent / "tasks").rglob("*.yaml")):
        cfg = load_yaml_config(str(path), mode="simple")
        if not isinstance(cfg, dict) or "task" not in cfg:
            continue  # a template or a group
        if cfg.get("output_type", "generate_until") != "generate_until":
            continue
        kwargs = dict(cfg.get("generation_kwargs") or {"do_sample": False})  # TaskConfig's default
        kwargs.update((cfg.get("model_specific_generation_kwargs") or {}).get("default", {}))
        out[str(path.relative_to(path.parents[1]))] = kwargs
    return out


@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    return task_configs()


def expected_refusal(g: Mapping[str, object]) -> str | None:
    """The key a config must be refused for, or None if it must decode."""
    if int(g.get("num_beams") or 1) != 1:
        return "num_beams"
    for key, neutral in DISTRIBUTION_CHANGING.items():
        if g.get(key) is not None and g[key] != neutral:
            return key
    if g.get("do_sample") is True and g.get("temperature") is not None and g["temperature"] == 0:
        return "temperature"
    return None


def expected_greedy(g: Mapping[str, object]) -> bool:
    if g.get("do_sample") is not None:
        return not g["do_sample"]
    return not g.get("temperature")


def test_every_task_config_decodes_or_is_refused_naming_the_key(configs: dict[str, dict]):
    assert len(configs) > 1000, "lmms-eval 0.7.3 ships well over a thousand such configs"
    greedy_top_p_0 = [name for name, g in configs.items()
                      if g.get("top_p") == 0 and expected_greedy(g)]
    assert len(greedy_top_p_0) >= 14, greedy_top_p_0  # MathVerse, DetailCaps, VCR, MMUPD, ...
    wrong = []
    for name, g in configs.items():
        key = expected_refusal(g)
        try:
            cfg = generation_config(g, default_max_new_tokens=16, eos_token_ids=(2,), seed=0)
        except ValueError as e:
            if key is None or key not in str(e):
                wrong.append(f"{name}: refused ({e}); expected {key or 'to decode'}")
            continue
        if key is not None:
            wrong.append(f"{name}: decodes, but {key}={g[key]!r} should be refused")
        elif cfg.sampling.greedy != expected_greedy(g):
            wrong.append(f"{name}: greedy={cfg.sampling.greedy} for {g}")
        elif not cfg.sampling.greedy and cfg.sampling.temperature != float(g.get("temperature", 1)):
            wrong.append(f"{name}: temperature {cfg.sampling.temperature} for {g}")
    assert not wrong, f"{len(wrong)} configs:\n" + "\n".join(wrong[:40])


def test_the_refused_configs_are_few_and_named(configs: dict[str, dict]):
    refused = {name: expected_refusal(g) for name, g in configs.items() if expected_refusal(g)}
    assert set(refused.values()) <= {"repetition_penalty"}, refused
    assert 0 < len(refused) <= 4, refused  # olympiadbench's COMP variants ask for 1.2
