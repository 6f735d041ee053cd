"""The config loader against hand-written expectations: coercion, overrides, errors, help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import yaml

from eve.config_loader import (
    ConfigError,
    config_from_argv,
    config_to_dict,
    field_docs,
    help_text,
    load_config,
    parse_argv,
    set_dotted,
)


@dataclass
class Item:
    """One list item."""

    path: str = ""
    """Where the item lives."""
    weight: float = 1.0
    """How much it counts."""


@dataclass
class Section:
    """A nested section."""

    lr: float = 0.1
    """A float."""
    steps: int | None = None
    """An optional integer."""
    betas: tuple[float, float] = (0.9, 0.999)
    """A pair."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """One of two words."""
    enabled: bool = False
    """A switch."""
    scale: dict[str, float] = field(default_factory=dict)
    """Named floats."""


@dataclass
class Root:
    """The root of the test tree."""

    name: str = "x"
    """A string."""
    items: list[Item] = field(default_factory=list)
    """A list of items."""
    section: Section = field(default_factory=Section)
    """The nested section."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything."""


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_values_are_coerced_by_field_type(tmp_path):
    """YAML 1.1 reads 4e-4 and "10" as strings; the field types make them a float and an int."""
    path = write(
        tmp_path,
        "name: 12\n"
        "items: [{path: a}, {path: b, weight: 2}]\n"
        "section: {lr: 4e-4, steps: '10', betas: [0.5, 0.6], enabled: 'yes', scale: {llm: 1}}\n"
        "extra: {k: [1, 2]}\n",
    )
    config = load_config(Root, path)
    assert config == Root(
        name="12",
        items=[Item("a", 1.0), Item("b", 2.0)],
        section=Section(lr=4e-4, steps=10, betas=(0.5, 0.6), enabled=True, scale={"llm": 1.0}),
        extra={"k": [1, 2]},
    )
    assert isinstance(config.section.lr, float) and isinstance(config.items[1].weight, float)
    assert load_config(Root, write(tmp_path, "section: {steps: 3.0}\n")).section.steps == 3
    assert load_config(Root, write(tmp_path, "section: {steps: null}\n")).section.steps is None
    assert load_config(Root) == Root()  # no file: the defaults


@pytest.mark.parametrize(
    "text, message",
    [
        ("section: {steps: 3.5}\n", "'section.steps' must be an integer, got 3.5"),
        ("section: {lr: fast}\n", "'section.lr' must be a number, got 'fast'"),
        ("section: {enabled: maybe}\n", "'section.enabled' must be true or false, got 'maybe'"),
        ("section: {schedule: linear}\n", "'section.schedule' must be one of ['cosine', 'constant']"),
        ("section: {betas: [0.9]}\n", "'section.betas' must be a list of 2 values"),
        ("section: {lr: null}\n", "'section.lr' may not be null"),
        ("items: {path: a}\n", "'items' must be a list"),
        ("section: 3\n", "'section' must be a mapping"),
        ("name: [a]\n", "'name' must be a string"),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_config(Root, write(tmp_path, text))
    assert str(e.value).startswith(f"{tmp_path / 'run.yaml'}: ") and message in str(e.value)


def test_unknown_keys_name_the_key_and_the_source(tmp_path):
    path = write(tmp_path, "section: {lr: 1, lr_warmup: 2}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key 'section\.lr_warmup' \(known keys of"):
        load_config(Root, path)
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key 'items\.1\.pth'"):
        load_config(Root, write(tmp_path, "items: [{path: a}, {pth: b}]\n"))
    with pytest.raises(ConfigError, match=r"^defaults \+ command line: unknown key 'sektion'"):
        load_config(Root, None, [("sektion.lr", 1)])
    with pytest.raises(ConfigError, match=r"run\.yaml \+ command line: unknown key 'section\.typo'"):
        load_config(Root, write(tmp_path, "name: a\n"), [("section.typo", 1)])
    with pytest.raises(ConfigError, match=r"config file .*missing\.yaml does not exist"):
        load_config(Root, tmp_path / "missing.yaml")
    assert issubclass(ConfigError, ValueError)


def test_set_dotted_sections_list_items_and_errors():
    """Nested keys create sections; list items go by index; bad paths name the failing part."""
    tree = {"a": {"b": 1}, "items": [{"path": "x"}, {"path": "y"}]}
    set_dotted(tree, "a.c.d", 2)
    set_dotted(tree, "items.1.path", "z")
    assert tree == {"a": {"b": 1, "c": {"d": 2}}, "items": [{"path": "x"}, {"path": "z"}]}
    with pytest.raises(ConfigError, match=r"'items.2': '2' is not an index of the 2-item list"):
        set_dotted(tree, "items.2.path", "w")
    with pytest.raises(ConfigError, match=r"'a.b' is not a section"):
        set_dotted(tree, "a.b.c", 3)


def test_overrides_reach_list_items_and_are_coerced(tmp_path):
    path = write(tmp_path, "items: [{path: a}, {path: b}]\n")
    config = load_config(Root, path, [("items.1.weight", "0.5"), ("section.betas", [1, 2])])
    assert config.items == [Item("a"), Item("b", 0.5)] and config.section.betas == (1.0, 2.0)
    with pytest.raises(ConfigError, match=r"command line: 'items.2': '2' is not an index of the 2-item list"):
        load_config(Root, path, [("items.2.path", "c")])


def test_both_override_forms_give_the_same_config(tmp_path):
    """`--key value`, `--key=value` (and the positional `key=value`) are one syntax; values are YAML."""
    path = str(write(tmp_path, "items: [{path: a}]\n"))
    spaced = ["--config", path, "--section.lr", "1e-4", "--items.0.path", "b", "--section.betas", "[1, 2]"]
    joined = ["--config=" + path, "--section.lr=1e-4", "--items.0.path=b", "--section.betas=[1, 2]"]
    positional = ["--config", path, "section.lr=1e-4", "items.0.path=b", "section.betas=[1, 2]"]
    configs = [config_from_argv(Root, argv)[0] for argv in (spaced, joined, positional)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].section.lr == 1e-4 and configs[0].items[0].path == "b"
    assert configs[0].section.betas == (1.0, 2.0)
    # null, booleans and an empty string; dashes in keys are underscores
    argv = ["--section.steps", "null", "--section.enabled", "true", "--name", "", "--extra.a-b", "{k: 1}"]
    assert parse_argv(argv)[1] == [
        ("section.steps", None),
        ("section.enabled", True),
        ("name", ""),
        ("extra.a_b", {"k": 1}),
    ]


def test_flags_and_command_line_errors():
    """Flags come back as text; a bare flag takes its default value; a key without a value is an error."""
    named, overrides = parse_argv(
        ["--config", "x.yaml", "--steps=scan,filter", "--resume", "--name", "3"],
        flags=("config", "steps", "resume"),
        bare={"resume": "auto"},
    )
    assert named == {"config": "x.yaml", "steps": "scan,filter", "resume": "auto"}
    assert overrides == [("name", 3)]
    assert parse_argv(["--resume", "runs/x"], ("resume",), {"resume": "auto"})[0] == {"resume": "runs/x"}
    with pytest.raises(ConfigError, match=r"command line: --name needs a value"):
        parse_argv(["--name"])
    with pytest.raises(ConfigError, match=r"command line: --name needs a value"):
        parse_argv(["--name", "--section.lr", "1"])
    with pytest.raises(ConfigError, match=r"command line: expected --key value, got 'stray'"):
        parse_argv(["stray"])
    config, named = config_from_argv(Root, ["--steps", "scan", "--name", "y"], flags=("steps",))
    assert (config.name, named) == ("y", {"steps": "scan"})


def test_help_lists_every_field_with_its_docstring():
    text = help_text(Root)
    lines = text.splitlines()
    expected = {
        "--name (str, default 'x'): A string.",
        "--items (list[Item], default []): A list of items.",
        "--items.N.path (str, default ''): Where the item lives.",
        "--items.N.weight (float, default 1.0): How much it counts.",
        "[section] The nested section.",
        "--section.lr (float, default 0.1): A float.",
        "--section.steps (int | None, default None): An optional integer.",
        "--section.betas (tuple[float, float], default (0.9, 0.999)): A pair.",
        "--section.schedule ('cosine' | 'constant', default 'cosine'): One of two words.",
        "--section.enabled (bool, default False): A switch.",
        "--section.scale (dict[str, float], default {}): Named floats.",
        "--extra (dict[str, Any], default {}): Anything.",
    }
    assert expected <= {line.strip() for line in lines}
    assert field_docs(Section)["betas"] == "A pair."


def test_to_dict_round_trips_through_yaml(tmp_path):
    config = Root(items=[Item("a", 2.0)], section=Section(betas=(0.1, 0.2), steps=5))
    plain = config_to_dict(config)
    assert plain["section"]["betas"] == [0.1, 0.2]  # tuples become lists (YAML-safe)
    assert load_config(Root, write(tmp_path, yaml.safe_dump(plain))) == config
