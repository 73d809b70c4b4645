"""``flowdppo.keys`` lists exactly the keys ``load_config`` accepts, each with its doc, default, allowed values and
readers, and ``flowdppo config`` shows them."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml
from test_new_algorithm import registered_rwr  # noqa: F401  (the fixture, by name)

from flowdppo.cli import main
from flowdppo.config import PRESETS, load_config, train_config_type
from flowdppo.errors import ConfigError
from flowdppo.keys import all_keys, find, reference_markdown
from flowdppo.overrides import flatten_keys
from flowdppo.samplers import SamplerConfig
from flowdppo.settings import TASKS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
REQUIRED = {"opd.teachers": "opd"}  # keys whose default the preset reading them refuses
COMPANIONS = {  # a choice that needs another key to load (the combination checks)
    "sampler.kind=ode": ["sampler.kl_kernel=flow_sde"],
    "sampler.logprob_convention=cps": ["sampler.kind=cps", "sampler.eta=0.8"],
    "sampler.kind=cps": ["sampler.eta=0.8"],
    "method=opd": ["opd.teachers=[runs/teacher]"],
    "algorithm=opd": ["opd.teachers=[runs/teacher]"],
    "crd.timesteps=stratified": ["crd.train_timesteps=9"],  # stratified: at most K - 1 levels
}


def accepted_keys(cls: type, prefix: str = "") -> set[str]:
    """The dotted keys of the composed ``TrainConfig``, walked through its nested dataclasses."""
    hints = typing.get_type_hints(cls)
    names = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            names |= accepted_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            names.add(prefix + f.name)
    return names


def loaded(name: str, value: str, extra: tuple[str, ...] = ()) -> typing.Any:
    """The value of ``name`` after loading ``name=value`` under the first method preset that reads it (a task's
    option with that task), or the error of every preset."""
    section = name.split(".")[0]
    context = [f"task={section}"] if section in TASKS else []
    if section == "opd" and name != "opd.teachers":  # opd trains only with a teacher (checked at setup to exist)
        context.append("opd.teachers=[runs/teacher]")
    errors = []
    for method in [None] if name == "method" else PRESETS:  # the method key: the preset itself
        try:
            cfg = load_config(method, overrides=[*context, *extra, f"{name}={value}"])
        except ConfigError as err:
            errors.append(str(err))
            continue
        for part in name.split("."):
            cfg = getattr(cfg, part)
        return cfg
    raise ConfigError("; ".join(dict.fromkeys(errors)))


def test_the_keys_are_exactly_what_load_config_accepts_and_each_loads_with_its_default():
    keys = all_keys()
    assert [k.name for k in keys] == list(dict.fromkeys(k.name for k in keys))  # no key twice
    assert {k.name for k in keys} == accepted_keys(train_config_type())
    for key in keys:
        if key.name in REQUIRED:  # no default: the preset that reads it refuses to run without one
            with pytest.raises(ConfigError, match=re.escape(key.name)):
                load_config(REQUIRED[key.name], overrides=[f"{key.name}={key.default}"])
            continue
        assert repr(loaded(key.name, key.default)) == key.default, key.name
    for unknown, named in (("sampler.num_step", "sampler.num_step"), ("epoch", "epoch"), ("nosuch.key", "nosuch")):
        with pytest.raises(ConfigError, match=f"unknown config key '{re.escape(named)}'"):
            load_config(overrides=[f"{unknown}=1"])


def test_every_key_has_a_doc_type_and_reader():
    for key in all_keys():
        assert len(key.doc.split()) >= 3, key.name  # a sentence, not a placeholder
        assert key.type and key.read_by and key.section == (key.name.split(".")[0] if "." in key.name else "run")


@pytest.mark.parametrize("key", [k for k in all_keys() if k.choices], ids=lambda k: k.name)
def test_the_allowed_values_are_exactly_those_the_config_accepts(key):
    for choice in key.choices:
        value = f"[{choice}]" if key.type.startswith("list") else choice
        got = loaded(key.name, value, tuple(COMPANIONS.get(f"{key.name}={choice}", ())))
        assert str(got[0] if isinstance(got, list) else got) == choice
    bogus = str(max(map(int, key.choices)) + 1) if key.type == "int" else "bogus_value"
    with pytest.raises(ConfigError) as refused:
        loaded(key.name, f"[{bogus}]" if key.type.startswith("list") else bogus)
    listed = re.search(rf"{re.escape(key.name)}: (?:must be one of |.*choose from )([^;]*)", str(refused.value))
    assert listed and listed.group(1).split(", ") == list(key.choices), str(refused.value)


def test_who_reads_a_key_is_who_accepts_it():
    beta = find("loss.beta")[0]
    assert {"policy_gradient", "diffusion_nft", "awm"} <= set(beta.read_by.removeprefix("algorithms ").split(", "))
    assert find("loss.clip_range")[0].read_by == "algorithm policy_gradient"
    with pytest.raises(ConfigError, match="loss.clip_range: the awm algorithm does not use it"):
        load_config("awm", overrides=["loss.clip_range=0.1"])
    assert load_config("awm", overrides=["loss.beta=0.1"]).loss.beta == 0.1
    assert find("digits.upsample")[0].read_by == "task digits"
    assert find("sampler.num_steps")[0].read_by == "every run" and find("epochs")[0].read_by == "every run"


@pytest.mark.usefixtures("registered_rwr")
def test_a_plugin_section_is_listed_and_in_the_reference():
    (temperature,) = find("rwr.temperature")
    assert temperature.read_by == "algorithm rwr" and temperature.default == "0.5"
    assert {k.name for k in all_keys()} == accepted_keys(train_config_type())
    assert "\n## rwr\n" in reference_markdown()


def test_the_reference_has_one_table_row_per_key_and_is_stable():
    page = reference_markdown()
    assert page == reference_markdown()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [k.name for k in all_keys()]
    (kind,) = [row for row in rows if row.startswith("| `sampler.kind` |")]
    assert "`'flow_sde'`" in kind and "`dance_sde`" in kind and "every run" in kind
    assert "\n## sampler\n" in page and "\n## text_to_video\n" in page


def test_flowdppo_config_lists_a_prefix_shows_a_key_and_names_the_closest_for_a_typo(capsys):
    assert main(["config", "sampler."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [f"sampler.{f.name}" for f in dataclasses.fields(SamplerConfig)]
    assert main(["config", "sampler.num_steps"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("sampler.num_steps\n") and re.search(r"default: +10\n", shown)
    assert "read by: every run" in shown and "Steps of the sampling schedule" in shown
    assert main(["config", "sampler.nm_steps"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1 and "did you mean sampler.num_steps?" in out.err
    assert main(["config"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(all_keys())
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "flowdppo config" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_key_of_an_example_recipe_is_a_key_and_carries_a_comment(recipe):
    text = recipe.read_text()
    uncommented = [line for line in text.splitlines() if re.match(r"\s*\w+:", line) and "  # " not in line]
    assert not uncommented
    names = {k.name for k in all_keys()}
    assert set(flatten_keys(yaml.safe_load(text))) <= names
    assert load_config(config_file=recipe).task in TASKS
