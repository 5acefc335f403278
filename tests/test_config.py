"""Tests for unime_jax.config: YAML → dataclasses, `extends`, `--set` overrides, error messages."""

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from unime_jax import config
from unime_jax.config import (
    ConfigError,
    add_config_args,
    apply_overrides,
    describe,
    dump_yaml,
    from_dict,
    load_yaml_tree,
    to_dict,
)
from unime_jax.runs.schema import Config, MeshSection, ModelSection


def load_config(path, overrides=(), cls=Config):
    """The generic loader with the run schema as the default dataclass (what the train CLI loads)."""
    return config.load_config(path, overrides, cls)


def config_from_args(args):
    return config.config_from_args(args, Config)

# --- small dataclasses exercising every supported field type ---------------------------------


@dataclass
class Inner:
    name: str  # required: no default
    weight: float = 1.0  # a float field that must accept ints


@dataclass
class Typed:
    lr: float = 1e-3  # learning rate, overridden with exponent notation
    tag: str = "x"  # a string that must not be coerced to a number
    flag: bool = False  # strict bool: 0/1 and "yes" are rejected
    maybe: int | None = None  # optional int
    ints: list[int] = field(default_factory=list)  # variable-length list
    shape: tuple[int, ...] = (1, 2)  # variable-length tuple
    pair: tuple[str, float] = ("a", 0.5)  # fixed tuple
    table: dict[str, float] = field(default_factory=dict)  # str-keyed mapping
    mode: Literal["fast", "slow"] = "fast"  # restricted string
    extra: Any = None  # anything goes
    inners: list[Inner] = field(default_factory=list)  # list of nested dataclasses
    opt_inner: Inner | None = None  # optional nested dataclass


@dataclass
class Outer:
    inner: Inner  # required nested section
    seed: int = 0  # plain int next to a section


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- loading -----------------------------------------------------------------------------------


def test_load_yaml_into_config(tmp_path: Path) -> None:
    cfg_file = write(
        tmp_path / "run.yaml",
        "model:\n  checkpoint: ckpt/phi\n  dtype: float32\nmesh:\n  fsdp: 4\nseed: 7\n",
    )
    cfg = load_config(cfg_file)
    assert cfg == Config(
        model=ModelSection(checkpoint="ckpt/phi", dtype="float32"),
        mesh=MeshSection(fsdp=4),
        seed=7,
    )
    # Keys the file does not mention keep their defaults.
    assert cfg.model.attention == "auto"
    assert cfg.workdir == "runs/default"


def test_defaults_without_file() -> None:
    assert load_config(None) == Config()
    assert load_config(None, ["seed=5"]).seed == 5


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "empty.yaml", "")) == Config()


# --- overrides ---------------------------------------------------------------------------------


def test_nested_override_beats_file(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "run.yaml", "model:\n  dtype: float32\nmesh:\n  fsdp: 4\n")
    cfg = load_config(cfg_file, ["model.dtype=bfloat16", "mesh.tensor=2", "workdir=runs/x"])
    assert cfg.model.dtype == "bfloat16"
    assert cfg.mesh == MeshSection(data=-1, fsdp=4, tensor=2)  # fsdp from the file survives
    assert cfg.workdir == "runs/x"


@pytest.mark.parametrize(
    ("text", "expected"), [("1e-4", 1e-4), ("5e-4", 5e-4), ("2e-5", 2e-5), ("1.5e3", 1500.0)]
)
def test_float_override_exponent_notation(text: str, expected: float) -> None:
    cfg = load_config(None, [f"lr={text}"], cls=Typed)
    assert isinstance(cfg.lr, float)
    assert cfg.lr == expected


def test_float_in_yaml_file_exponent_notation(tmp_path: Path) -> None:
    # Plain PyYAML reads `1e-4` as a string; the config loader must not.
    cfg = load_config(write(tmp_path / "t.yaml", "lr: 1e-4\n"), cls=Typed)
    assert cfg.lr == 1e-4


def test_quoted_number_stays_string() -> None:
    cfg = load_config(None, ["tag='1e-4'"], cls=Typed)
    assert cfg.tag == "1e-4"


def test_int_accepted_for_float_and_converted() -> None:
    cfg = load_config(None, ["lr=1"], cls=Typed)
    assert type(cfg.lr) is float
    assert cfg.lr == 1.0


def test_apply_overrides_values_and_no_mutation() -> None:
    tree = {"a": {"b": 1}}
    out = apply_overrides(tree, ["a.c=[1, 2]", "a.b=null", "x.y.z=hello", "n=3"])
    assert out == {"a": {"b": None, "c": [1, 2]}, "x": {"y": {"z": "hello"}}, "n": 3}
    assert tree == {"a": {"b": 1}}  # input untouched


@pytest.mark.parametrize("bad", ["seed", "=3", "model..dtype=x", ".seed=1"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError, match="malformed override") as err:
        apply_overrides({}, [bad])
    assert repr(bad) in str(err.value)


def test_override_through_scalar_is_error() -> None:
    with pytest.raises(ConfigError, match=r"override 'seed\.x=1': 'seed' holds int 1, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=1"])
    # Without a value in the tree the section is created and from_dict reports the type error.
    with pytest.raises(ConfigError, match=r"seed: expected int, got dict \{'x': 1\} \(in --set seed\.x=1\)"):
        load_config(None, ["seed.x=1"])


# --- unknown keys -----------------------------------------------------------------------------


def test_unknown_key_in_file(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "typo.yaml", "model:\n  chekpoint: ckpt/phi\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file)
    msg = str(err.value)
    assert "'model.chekpoint'" in msg
    assert str(cfg_file) in msg
    assert "did you mean 'checkpoint'" in msg
    # Valid keys at that level are listed, the close match first.
    assert "valid keys in 'model'" in msg
    assert msg.index("checkpoint, ") < msg.index("remat")


def test_unknown_top_level_key_in_file(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "typo.yaml", "sead: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'sead' in .*typo\.yaml: did you mean 'seed'"):
        load_config(cfg_file)


def test_unknown_key_names_the_base_file_it_came_from(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "mesh:\n  tensr: 2\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nseed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert f"unknown key 'mesh.tensr' in {base}" in str(err.value)


def test_unknown_key_via_set(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "ok.yaml", "seed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, ["mesh.tensr=2"])
    msg = str(err.value)
    assert "'mesh.tensr'" in msg
    assert "--set mesh.tensr=2" in msg
    assert str(cfg_file) not in msg  # the file is not to blame
    assert "did you mean 'tensor'" in msg


def test_unknown_section_via_set_without_file() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown key 'modle' in --set modle\.dtype=float32: did you mean 'model'"
    ):
        load_config(None, ["modle.dtype=float32"])


# --- type errors -------------------------------------------------------------------------------


def test_wrong_type_names_field_and_value() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["mesh.fsdp=abc"])
    assert "mesh.fsdp: expected int, got str 'abc'" in str(err.value)


def test_wrong_type_in_file_names_file(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "bad.yaml", "mesh:\n  data: 2.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file)
    assert "mesh.data: expected int, got float 2.5" in str(err.value)
    assert str(cfg_file) in str(err.value)


@pytest.mark.parametrize("value", ["1", "0", "yes_please", "'true'"])
def test_bool_is_strict(value: str) -> None:
    with pytest.raises(ConfigError, match="flag: expected bool"):
        load_config(None, [f"flag={value}"], cls=Typed)


def test_bool_not_accepted_as_int() -> None:
    with pytest.raises(ConfigError, match="seed: expected int, got bool True"):
        load_config(None, ["seed=true"])


def test_literal_violation_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.dtype=fp16"])
    msg = str(err.value)
    assert "model.dtype" in msg
    assert "'float32', 'bfloat16'" in msg
    assert "'fp16'" in msg


def test_section_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match="model: expected a mapping of ModelSection fields, got int 3"):
        load_config(None, ["model=3"])


def test_missing_required_field() -> None:
    with pytest.raises(ConfigError, match=r"missing required field 'inner\.name'"):
        from_dict(Outer, {"inner": {"weight": 2}})
    with pytest.raises(ConfigError, match=r"missing required field 'inner'"):
        from_dict(Outer, {"seed": 1})


def test_missing_required_field_names_file(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "outer.yaml", "inner:\n  weight: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, cls=Outer)
    assert "'inner.name'" in str(err.value)
    assert str(cfg_file) in str(err.value)


# --- extends ---------------------------------------------------------------------------------


def test_extends_chain_deep_merge(tmp_path: Path) -> None:
    write(
        tmp_path / "base.yaml",
        "model:\n  dtype: float32\n  attention: xla\nmesh:\n  fsdp: 2\nworkdir: runs/base\nseed: 1\n",
    )
    write(tmp_path / "child.yaml", "extends: base.yaml\nmodel:\n  attention: cudnn\nmesh:\n  tensor: 2\n")
    # The grandchild lives in a subdirectory: `extends` is relative to the including file.
    grandchild = write(
        tmp_path / "exp" / "gc.yaml", "extends: ../child.yaml\nworkdir: runs/gc\nmesh:\n  data: 4\n"
    )
    cfg = load_config(grandchild)
    assert cfg.model == ModelSection(dtype="float32", attention="cudnn")
    assert cfg.mesh == MeshSection(data=4, fsdp=2, tensor=2)
    assert cfg.workdir == "runs/gc"
    assert cfg.seed == 1


def test_extends_lists_replace_and_multiple_bases(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "ints: [1, 2, 3]\ntable: {x: 1.0, y: 2.0}\nmode: slow\n")
    write(tmp_path / "b.yaml", "tag: from_b\nmode: fast\n")
    child = write(tmp_path / "c.yaml", "extends: [a.yaml, b.yaml]\nints: [9]\ntable: {y: 5.0}\n")
    tree = load_yaml_tree(child)
    assert tree == {"ints": [9], "table": {"x": 1.0, "y": 5.0}, "mode": "fast", "tag": "from_b"}
    assert "extends" not in tree


@pytest.mark.parametrize("self_cycle", [False, True])
def test_extends_cycle(tmp_path: Path, self_cycle: bool) -> None:
    if self_cycle:
        start = write(tmp_path / "a.yaml", "extends: a.yaml\n")
    else:
        start = write(tmp_path / "a.yaml", "extends: b.yaml\nseed: 1\n")
        write(tmp_path / "b.yaml", "extends: a.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match="'extends' cycle") as err:
        load_yaml_tree(start)
    assert "a.yaml" in str(err.value)


def test_extends_diamond_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "root.yaml", "seed: 1\n")
    write(tmp_path / "left.yaml", "extends: root.yaml\nworkdir: left\n")
    write(tmp_path / "right.yaml", "extends: root.yaml\nmesh: {fsdp: 2}\n")
    top = write(tmp_path / "top.yaml", "extends: [left.yaml, right.yaml]\n")
    assert load_yaml_tree(top) == {"seed": 1, "workdir": "left", "mesh": {"fsdp": 2}}


def test_missing_base_names_both_files(tmp_path: Path) -> None:
    child = write(tmp_path / "child.yaml", "extends: nope.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_yaml_tree(child)
    assert "nope.yaml" in str(err.value)
    assert str(child) in str(err.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "a: [1, 2\n"])
def test_bad_yaml_file_names_file(tmp_path: Path, text: str) -> None:
    bad = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_yaml_tree(bad)
    assert str(bad) in str(err.value)


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="cannot read config file") as err:
        load_config(missing)
    assert str(missing) in str(err.value)


# --- containers and round trip ------------------------------------------------------------------


def test_container_fields() -> None:
    cfg = from_dict(
        Typed,
        {
            "maybe": 3,
            "ints": [1, 2],
            "shape": [4, 5, 6],
            "pair": ["b", 2],
            "table": {"a": 1, "b": 2.5},
            "extra": {"free": ["form"]},
            "inners": [{"name": "p"}, {"name": "q", "weight": 3}],
            "opt_inner": {"name": "r"},
        },
    )
    assert cfg.maybe == 3
    assert cfg.ints == [1, 2]
    assert cfg.shape == (4, 5, 6)
    assert cfg.pair == ("b", 2.0)
    assert type(cfg.pair[1]) is float
    assert cfg.table == {"a": 1.0, "b": 2.5}
    assert cfg.extra == {"free": ["form"]}
    assert cfg.inners == [Inner("p"), Inner("q", 3.0)]
    assert cfg.opt_inner == Inner("r")
    assert from_dict(Typed, {"maybe": None, "opt_inner": None}) == Typed()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"ints": [1, "x"]}, "ints[1]: expected int, got str 'x'"),
        ({"ints": 5}, "ints: expected list[int], got int 5"),
        ({"shape": [1, 2.5]}, "shape[1]: expected int, got float 2.5"),
        ({"pair": ["a", 1, 2]}, "pair: expected tuple[str, float] with 2 items, got 3"),
        ({"table": {"a": "b"}}, "table.a: expected float, got str 'b'"),
        ({"table": [1]}, "table: expected dict[str, float], got list [1]"),
        ({"maybe": "3"}, "maybe: expected int | None, got str '3'"),
        ({"inners": [{"name": "ok"}, {"nam": "typo"}]}, "unknown key 'inners[1].nam': did you mean 'name'"),
        ({"opt_inner": {"name": 1}}, "opt_inner.name: expected str, got int 1"),
        ({"mode": "medium"}, "mode: expected one of 'fast', 'slow', got str 'medium'"),
    ],
)
def test_container_errors(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(Typed, data)
    assert expected in str(err.value)


def test_from_dict_where_prefix_and_source() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(Inner, {"name": "a", "wieght": 2}, where="model.head", source="ckpt/config.yaml")
    assert "unknown key 'model.head.wieght' in ckpt/config.yaml: did you mean 'weight'" in str(err.value)


def test_round_trip_to_dict_from_dict(tmp_path: Path) -> None:
    typed = Typed(
        lr=2e-5,
        tag="t",
        flag=True,
        maybe=4,
        ints=[3],
        shape=(7, 8),
        pair=("z", 1.5),
        table={"k": 0.25},
        mode="slow",
        extra=[1, "two"],
        inners=[Inner("a", 0.5)],
        opt_inner=Inner("b"),
    )
    plain = to_dict(typed)
    assert plain["shape"] == [7, 8]  # tuples become YAML-friendly lists
    assert plain["inners"] == [{"name": "a", "weight": 0.5}]
    assert from_dict(Typed, plain) == typed

    cfg = Config(model=ModelSection(checkpoint="c", remat="full"), mesh=MeshSection(data=2, fsdp=4), seed=3)
    dump_yaml(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml") == cfg
    dump_yaml(typed, tmp_path / "typed.yaml")
    assert load_config(tmp_path / "typed.yaml", cls=Typed) == typed


# --- argparse and describe ---------------------------------------------------------------------


def test_argparse_integration(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "run.yaml", "seed: 3\nmesh:\n  fsdp: 2\n")
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(["--config", str(cfg_file), "--set", "seed=4", "--set", "model.remat=full"])
    cfg = config_from_args(args)
    assert (cfg.seed, cfg.mesh.fsdp, cfg.model.remat) == (4, 2, "full")
    assert config_from_args(parser.parse_args([])) == Config()


def test_describe_lists_sections_types_defaults_and_comments() -> None:
    text = describe(Config)
    assert "[model]" in text
    assert "[mesh]" in text
    assert "dtype: 'float32' | 'bfloat16' = 'bfloat16'  # compute dtype" in text
    assert "seed: int = 0" in text
    # Inherited fields keep their comments (Stage2Section's steps come from StageSection).
    stage2 = text[text.index("[stage2]") :]
    assert "steps: int | None = None  # train steps" in stage2
    # Optional sections are listed too, marked as such.
    assert "[demo]" in text and "(optional section; absent = null)" in text
    nested = describe(Outer)
    assert "[inner]" not in nested  # a required section has no default instance to show
    assert "inner: Inner = (required)" in nested
