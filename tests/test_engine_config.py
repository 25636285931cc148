"""EngineConfig: one declaration per engine option, the CLI flags generated from it, LLMEngine and
LLM taking the same names, validation naming the field."""

from __future__ import annotations

import argparse
import re
from dataclasses import MISSING

import pytest

from tokenmill import LLM, InvalidParameterError, UnknownOptionError
from tokenmill.config import (
    CacheConfig, EnergyConfig, EngineConfig, ModelOptions, PolicyConfig, QuantizationConfig, SchedulerConfig,
    SpeculativeConfig, engine_options,
)
from tokenmill.engine.engine import LLMEngine
from tokenmill.entrypoints import cli


def engine_actions() -> dict[str, argparse.Action]:
    """The engine flags of `tokenmill generate`, by dest."""
    parser = argparse.ArgumentParser(parents=[cli.engine_parent()], add_help=False)
    return {a.dest: a for a in parser._actions}


def test_every_option_has_a_flag_and_every_flag_an_option():
    names = [o.name for o in engine_options()]
    assert len(names) == len(set(names)), "two options share a flat name"
    assert set(engine_actions()) == set(names)
    assert set(cli.ENGINE_OPTIONS) == set(names) - {"model"}  # --model is LLMEngine's first argument


def test_the_cli_help_shows_the_dataclass_defaults():
    actions = engine_actions()
    for option in engine_options():
        action = actions[option.name]
        assert action.default is None, f"--{option.name}: left out, the engine's default must apply"
        assert action.help == option.help
        meta = option.field.metadata
        if meta["default_text"] is None and option.field.default not in (MISSING, None):
            shown = re.search(r"\(default: ([^,)]*)", action.help)
            assert shown, f"--{option.name}: its help does not show its default"
            value = option.field.default
            expected = ("on" if value else "off") if isinstance(value, bool) else format(value, "g") \
                if isinstance(value, float) else str(value)
            assert shown.group(1) == expected, f"--{option.name}"


def test_the_speculative_config_help_lists_every_key():
    help_text = engine_actions()["speculative_config"].help
    for key in SpeculativeConfig.__dataclass_fields__:
        assert key in help_text


def test_cli_flags_become_the_expected_config():
    args = cli.build_parser().parse_args([
        "generate", "hi", "--model", "m.gguf", "--dtype", "bfloat16", "--device", "cpu", "--seed", "3",
        "--max-model-len", "512", "--tensor-parallel-size", "2", "--block-size", "32", "--kv-cache-memory", "64MiB", "--kv-cache-fraction", "0.1",
        "--no-enable-prefix-caching", "--kv-cache-dtype", "int8", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "256", "--scheduling-policy", "fair", "--tenant-weights", "a=2,b=1",
        "--quantization", "int4", "--quantization-group-size", "64",
        "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}',
        "--energy-meter", "estimate", "--cpu-watts-per-core", "5", "--price-per-hour", "1.5"])
    kwargs = cli.engine_kwargs(args)
    assert "model" not in kwargs and kwargs["kv_cache_memory"] == "64MiB"
    config = EngineConfig.from_kwargs(model=args.model, **kwargs)
    assert config == EngineConfig(
        model=ModelOptions("m.gguf", "bfloat16", "cpu", 3, 512, tensor_parallel_size=2),
        cache=CacheConfig(32, 64 * 2**20, 0.1, False, "int8"),
        scheduler=SchedulerConfig(8, 256, PolicyConfig("fair", tenant_weights={"a": 2.0, "b": 1.0})),
        quantization=QuantizationConfig("int4", 64),
        speculation=SpeculativeConfig("ngram", num_speculative_tokens=2),
        metering=EnergyConfig("estimate", 5.0, price_per_hour=1.5))


def test_flags_left_out_keep_the_defaults():
    args = cli.build_parser().parse_args(["generate", "hi"])
    assert cli.engine_kwargs(args) == {}
    assert EngineConfig.from_kwargs(**cli.engine_kwargs(args)) == EngineConfig()


def test_from_kwargs_nests_and_round_trips():
    config = EngineConfig.from_kwargs(max_num_seqs=4, scheduling_policy="aging", priority_aging_seconds=2.0,
                                      quantization="int8", energy_price=0.3, speculative_config={"method": "ngram"})
    assert config.scheduler.max_num_seqs == 4
    assert config.scheduler.policy.name == "aging" and config.scheduler.policy.aging_seconds == 2.0
    assert config.quantization.method == "int8"
    assert config.metering.energy_price == 0.3
    assert config.speculation == SpeculativeConfig("ngram")
    flat = config.to_kwargs()
    assert set(flat) == {o.name for o in engine_options()}
    assert EngineConfig.from_kwargs(**flat) == config


@pytest.mark.parametrize("make", [LLMEngine, LLM, EngineConfig.from_kwargs])
def test_an_unknown_option_is_named(make):
    with pytest.raises(UnknownOptionError, match="max_num_seq.*did you mean 'max_num_seqs'") as e:
        make(max_num_seq=8)
    assert e.value.param == "max_num_seq"
    assert isinstance(e.value, TypeError)  # what Python raises for an unexpected keyword argument


@pytest.mark.parametrize("kwargs, param", [({"max_num_seqs": 0}, "max_num_seqs"),
                                           ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
                                           ({"block_size": 0}, "block_size"),
                                           ({"kv_cache_fraction": 1.5}, "kv_cache_fraction"),
                                           ({"kv_cache_fraction": 0}, "kv_cache_fraction"),
                                           ({"kv_cache_memory": "lots"}, "kv_cache_memory"),
                                           ({"scheduling_policy": "lifo"}, "scheduling_policy"),
                                           ({"tenant_weights": "a=x"}, "tenant_weights"),
                                           ({"speculative_config": {"method": "magic"}}, "speculative_config.method")])
def test_validation_names_the_field(kwargs, param):
    with pytest.raises(InvalidParameterError) as e:
        EngineConfig.from_kwargs(**kwargs)
    assert e.value.param == param
    with pytest.raises(InvalidParameterError) as e:  # before any model is loaded
        LLMEngine("no/such/model", **kwargs)
    assert e.value.param == param


def test_a_bad_flag_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["generate", "hi", "--kv-cache-memory", "lots"])
    assert e.value.code == 2
    assert "--kv-cache-memory" in capsys.readouterr().err


def test_engines_from_kwargs_and_from_config_agree(stories_path):
    options = dict(dtype="float32", kv_cache_memory="4MiB", max_num_seqs=4, block_size=8, seed=0,
                   enable_prefix_caching=False)
    engine = LLMEngine(str(stories_path), **options)
    config = EngineConfig.from_kwargs(model=str(stories_path), **options)
    assert engine.config == config
    other = LLMEngine.from_config(config)
    assert other.config is config
    assert other.max_model_len == engine.max_model_len
    assert other.block_pool.num_usable_blocks == engine.block_pool.num_usable_blocks
    assert other.kv_cache.block_size == 8 and other.scheduler.max_num_seqs == 4
    assert not other.kv_cache.enable_prefix_caching
