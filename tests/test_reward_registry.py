"""The one reward registry: every built-in reward once with its kind, one resolution of a name for every task, and
an unknown name as one line with the closest valid name and the names the task takes."""

import pytest
import torch

from flowdppo.cli import main
from flowdppo.errors import ConfigError
from flowdppo.rewards.registry import REWARDS, RewardContext, load_rewards, make_reward, register_reward, reward_names
from flowdppo.tasks.text_to_image import TextToImageTask
from flowdppo.tasks.text_to_video import TextToVideoTask

DIGITS = ["classifier_prob", "classifier_logprob", "ink"]
IMAGE = [
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "clip_score",
    "pickscore",
    "aesthetic",
    "ocr",
    "vlm_yes_prob",
    "vlm_yes_prob_default_question",
    "vlm_ocr",
    "hpsv2",
]
VIDEO = ["temporal_consistency"]
NO_MODEL = [
    "classifier_prob",
    "classifier_logprob",
    "ink",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "temporal_consistency",
]


def test_every_built_in_reward_is_registered_once_with_its_kind():
    assert {name: entry.kind for name, entry in REWARDS.items()} == (
        dict.fromkeys(DIGITS, "digits") | dict.fromkeys(IMAGE, "image") | dict.fromkeys(VIDEO, "video")
    )
    assert reward_names(("digits",)) == DIGITS and reward_names(("image",)) == IMAGE
    assert [name for name, entry in REWARDS.items() if not entry.default_model] == NO_MODEL
    with pytest.raises(ValueError, match="registered already"):
        register_reward("ink", "digits", lambda model, context: None)
    with pytest.raises(ValueError, match="kind must be one of digits, image, video"):
        register_reward("loudness", "audio", lambda model, context: None)


def test_rewards_without_a_model_build_under_their_own_name():
    for name in NO_MODEL:
        reward = make_reward(name)
        assert reward.name == name
        with pytest.raises(ConfigError, match=rf"reward '{name}' has no model; drop '@x'"):
            make_reward(f"{name}@x")
    images = torch.rand(2, 3, 8, 8)
    assert make_reward("jpeg_incompressibility")(images, ["a", "b"]).shape == (2,)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("kinds", "typo", "suggestion", "valid", "invalid"),
    [
        (TextToImageTask.reward_kinds, "pickscor", "pickscore", IMAGE, DIGITS + VIDEO),
        (TextToVideoTask.reward_kinds, "temporal_consistensy", "temporal_consistency", IMAGE + VIDEO, DIGITS),
        (("digits",), "clasifier_prob", "classifier_prob", DIGITS, IMAGE + VIDEO),
    ],
)
def test_an_unknown_name_says_the_closest_name_and_the_names_of_the_task(kinds, typo, suggestion, valid, invalid):
    with pytest.raises(ConfigError) as err:
        load_rewards([typo], kinds, RewardContext())
    message = one_line(err)
    assert message.startswith(
        f"reward.names: unknown reward '{typo}' (did you mean {suggestion}?); choose from {', '.join(valid)}"
    )
    assert message.endswith("or give your own as module:function")
    assert not [name for name in invalid if f" {name}," in message or f" {name} " in message]


def test_a_reward_of_another_kind_is_named_as_such():
    with pytest.raises(ConfigError) as err:
        load_rewards(["pickscore"], ("digits",), RewardContext())
    assert one_line(err).startswith(
        "reward.names: unknown reward 'pickscore' (it is an image reward); choose from "
        "classifier_prob, classifier_logprob, ink"
    )


def test_a_misspelt_reward_of_another_kind_is_suggested_with_its_kind():
    with pytest.raises(ConfigError) as err:
        load_rewards(["pickscor"], ("digits",), RewardContext())
    assert one_line(err).startswith(
        "reward.names: unknown reward 'pickscor' (did you mean pickscore? it is an image reward); choose from "
        "classifier_prob, classifier_logprob, ink"
    )


def test_two_names_of_one_reward_are_refused_and_digits_rewards_share_the_classifier():
    context = RewardContext()
    rewards = load_rewards(["classifier_prob", "classifier_logprob"], ("digits",), context)
    assert [name for name, _ in rewards] == ["classifier_prob", "classifier_logprob"]
    assert rewards[0][1].classifier is rewards[1][1].classifier is context.classifier
    with pytest.raises(ConfigError, match="'ink' and 'ink' are both the reward 'ink'; give each reward once"):
        load_rewards(["ink", "ink"], ("digits",), context)


def test_the_digits_task_refuses_a_misspelt_reward_in_one_line(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "reward.names=[inc]", "epochs=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert (
        "reward.names: unknown reward 'inc' (did you mean ink?); choose from classifier_prob, classifier_logprob, "
        "ink or give your own as module:function" in err[0]
    )
