"""model_args and gen_kwargs parsing: conversion by field type, and errors that name the key."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

import torch

from lmms_sd.core.sampling import SamplingConfig, logits_to_probs
from lmms_sd.lmms_eval.args import (SDArgs, coerce, cut_at_stop, from_mapping, generation_config,
                                    parse_model_args, split_model_args, stop_strings)
from lmms_sd.trees.chain import ChainConfig


def parse(arg_string: str) -> tuple[SDArgs, dict]:
    args, groups = parse_model_args(SDArgs, split_model_args(arg_string), ("tree",))
    return args, groups["tree"]


def test_values_are_converted_by_field_type():
    args, tree = parse("pretrained=0001,draft=/m/d,sd=off,max_new_tokens=32,"
                       "seed=7,stats_path=none,tree=chain,tree.k=6")
    # "0001" stays a path (lmms-eval's own parser would make it the integer 1)
    assert args.pretrained == "0001" and args.draft == "/m/d"
    assert args.sd is False and args.max_new_tokens == 32 and args.seed == 7
    assert args.stats_path is None and tree == {"k": "6"}


def test_booleans_ints_and_optionals():
    args, tree = parse("pretrained=/m/t,draft=/m/d,baseline=true,max_new_tokens=32,seed=7,"
                       "stats_path=none,device=cpu")
    assert args.baseline is True and args.sd is True
    assert args.max_new_tokens == 32 and args.seed == 7
    assert args.stats_path is None and args.device == "cpu"
    assert tree == {}


def test_tree_keys_are_split_off_for_the_builder():
    args, tree = parse("pretrained=/m/t,tree=chain,tree.k=6,tree.top_k=10")
    assert args.tree == "chain"
    assert tree == {"k": "6", "top_k": "10"}
    assert from_mapping(ChainConfig, {"k": tree["k"]}) == ChainConfig(k=6)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="'drfat'"):
        parse("pretrained=/m/t,drfat=/m/d")
    with pytest.raises(ValueError, match="'cal.nodes'"):  # a group this class does not have
        parse("pretrained=/m/t,cal.nodes=4")


def test_missing_required_key_is_named():
    with pytest.raises(ValueError, match="'pretrained'"):
        parse("draft=/m/d")


@pytest.mark.parametrize("arg_string, needle", [
    ("pretrained=/m/t,max_new_tokens=many", "max_new_tokens='many'"),
    ("pretrained=/m/t,sd=maybe", "sd='maybe'"),
    ("pretrained=/m/t,batch_size=4", "batch_size must be 1"),
    ("pretrained=/m/t,dtype=float64", "dtype must be one of"),
    ("pretrained=/m/t,sd=off,baseline=true", "nothing to compare"),
    ("pretrained=/m/t,draft", "not of the form key=value"),
    ("pretrained=/m/t,pretrained=/m/u", "given twice"),
])
def test_bad_values_are_errors(arg_string: str, needle: str):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        parse(arg_string)


def test_cli_typed_values_are_accepted():
    """lmms-eval passes batch_size/device typed (or as strings) next to our raw strings."""
    args, _ = parse_model_args(SDArgs, {"pretrained": "/m/t", "batch_size": "1", "device": None,
                                        "max_new_tokens": 16.0, "sd": True}, ("tree",))
    assert args.batch_size == 1 and args.device is None and args.max_new_tokens == 16


def test_coerce_tuple_and_optional():
    assert coerce("a;b; c", tuple[str, ...]) == ("a", "b", "c")
    assert coerce("1;2", tuple[int, ...]) == (1, 2)
    assert coerce("null", int | None) is None
    assert coerce("3", int | None) == 3
    with pytest.raises(ValueError, match="x=2.5"):
        coerce(2.5, int, key="x")


@dataclass(frozen=True)
class _Demo:
    rate: float
    name: str = "n"


def test_from_mapping_lists_valid_keys():
    with pytest.raises(ValueError, match="valid keys: name, rate"):
        from_mapping(_Demo, {"rat": "0.5"})
    assert from_mapping(_Demo, {"rate": "0.5"}) == _Demo(0.5)


# ---------------------------------------------------------------------------- gen_kwargs

def config(**gen_kwargs):
    return generation_config(gen_kwargs, default_max_new_tokens=99, eos_token_ids=(2,), seed=5)


def test_gen_kwargs_defaults_are_greedy():
    cfg = config(until=["\n\n"])
    assert cfg.sampling == SamplingConfig() and cfg.sampling.greedy
    assert cfg.max_new_tokens == 99 and cfg.eos_token_ids == (2,) and cfg.seed == 5
    assert cfg.stop_strings == ("\n\n",)


def test_gen_kwargs_sampling_settings_are_honoured():
    cfg = config(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=20, do_sample=True,
                 until="###", num_beams=1, image_aspect_ratio="pad")
    assert cfg.max_new_tokens == 12 and cfg.stop_strings == ("###",)
    assert cfg.sampling == SamplingConfig(temperature=0.7, top_p=0.9, top_k=20)


def test_do_sample_false_wins_over_temperature():
    assert config(temperature=0.7, do_sample=False).sampling.greedy
    assert config(do_sample=True).sampling.temperature == 1.0
    assert config(temperature=0, top_p=None, do_sample=False).sampling == SamplingConfig()


def test_greedy_ignores_the_sampling_filters_as_transformers_does():
    # MathVerse, VCR, DetailCaps, ...: top_p 0 is a sampling filter, and nobody samples
    assert config(temperature=0, top_p=0, do_sample=False, num_beams=1).sampling == SamplingConfig()
    assert config(temperature=0, top_p=-3, top_k=-1).sampling.greedy
    with pytest.raises(ValueError, match="top_p must be in"):
        config(temperature=0.5, top_p=1.5)


def test_do_sample_with_temperature_zero_is_refused_as_in_transformers():
    with pytest.raises(ValueError, match="do_sample=True with temperature=0"):
        config(do_sample=True, temperature=0)


def test_top_p_zero_when_sampling_keeps_the_most_likely_token():
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0]])  # [1, V]
    probs = logits_to_probs(logits, config(do_sample=True, top_p=0).sampling)
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_unknown_gen_kwargs_key_is_named_and_inert_keys_are_accepted():
    with pytest.raises(ValueError, match="unknown gen_kwargs key 'temprature'"):
        config(temprature=0.2)
    cfg = config(visual_cot=True, max_agentic_steps=8, skip_special_tokens=False, seed=0,
                 stop_sequences=["\n"], image_aspect_ratio="original")
    assert cfg.sampling.greedy


def test_num_beams_above_one_is_an_error():
    with pytest.raises(ValueError, match="num_beams=4"):
        config(num_beams=4)


def test_distribution_changing_kwargs_are_errors():
    with pytest.raises(ValueError, match="repetition_penalty"):
        config(repetition_penalty=1.2)
    assert config(repetition_penalty=1.0).sampling.greedy


def test_stop_strings_and_cut():
    assert stop_strings(None) == () and stop_strings("") == ()
    assert stop_strings(["a", "", "b"]) == ("a", "b")
    with pytest.raises(ValueError, match="until"):
        stop_strings(3)
    assert cut_at_stop("one two\n\nthree###", ("###", "\n\n")) == "one two"
    assert cut_at_stop("no stop here", ("###",)) == "no stop here"


def test_msd_model_path_is_the_seeds_name_for_draft():
    from lmms_sd.lmms_eval.args import MSDArgs, MSDCalibratedArgs, from_mapping

    for cls in (MSDArgs, MSDCalibratedArgs):
        assert from_mapping(cls, {"pretrained": "t", "msd_model_path": "h"}).draft == "h"
        assert from_mapping(cls, {"pretrained": "t", "draft": "h"}).draft == "h"
        with pytest.raises(ValueError, match="two different heads"):
            from_mapping(cls, {"pretrained": "t", "draft": "g", "msd_model_path": "h"})
