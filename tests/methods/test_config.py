"""Method settings: config dataclasses, their defaults, and the checks on user values."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import assert_one_line_error

from conceptstream import api
from conceptstream.engine import one_dc_temperature
from conceptstream.errors import UserInputError
from conceptstream.methods.config import DCScoresConfig
from conceptstream.methods.registry import get_method, method_defaults, method_names, validate_settings
from conceptstream.scoring.dc import DCConfig

# Every method's settings as `method_defaults(name, "lora")` returned them before the settings became
# config dataclasses (copied from that run): names and order must not change, and values only when a method's
# tuning on val (benchmarks/results/tuning/, docs/DEFAULTS.md) chose new ones: lora, lora-ewc, c-lora,
# ewc-dc, textual-inversion, dsc, dsc-ewc, custom-diffusion, dsc-ewc-dc.
TRAIN = {"lr": 0.001, "token_lr": 0.005, "batch_size": 4}
EWC = {"ewc_lambda": 100.0, "ewc_gamma": 1.0, "fisher_passes": 2, "fisher_norm": True}
DSC = {"dsc_iters": 25, "dsc_redraw_every": 1, "dsc_w_dc": 1.0, "dsc_w_eps": 1.0}
BEFORE = {
    "c-lora": {"lr": 0.001, "token_lr": 0.002, "batch_size": 4, "clora_lambda": 100.0},
    "custom-diffusion": {"lr": 0.0001, "token_lr": 0.002, "batch_size": 4},
    "dsc": {**TRAIN, "dc_k": 2, "dc_batch": 1, "dc_temperature": 0.005, **DSC, "dsc_iters": 10},
    "dsc-ewc": {**TRAIN, "lr": 0.003, **EWC, "dc_k": 2, "dc_batch": 1, "dc_temperature": 0.005, **DSC, "dsc_iters": 100},
    "dsc-ewc-dc": {**TRAIN, "lr": 0.0003, "token_lr": 0.02, **EWC, "dc_delta": 0.1, "dc_k": 2, "dc_batch": 1,
                   "dc_temperature": 0.005, **DSC, "dsc_iters": 10},
    "ewc-dc": {**TRAIN, "lr": 0.0003, "token_lr": 0.02, **EWC, "ewc_lambda": 10.0, "dc_delta": 0.1, "dc_k": 2, "dc_batch": 1,
               "dc_temperature": 0.005},
    "lora": {**TRAIN, "lr": 0.0003, "token_lr": 0.002},
    "lora-ewc": {**TRAIN, "lr": 0.003, **EWC, "ewc_lambda": 1000.0},
    "textual-inversion": {**TRAIN, "token_lr": 0.002},
}
# lr on VeRA (its val grid, stage vera-lr-val) and without an adapter (None), where it differs from the LoRA row
LR_VERA = {"dsc": 0.003, "dsc-ewc": 0.003, "dsc-ewc-dc": 0.003, "ewc-dc": 0.003, "lora": 0.003, "lora-ewc": 0.003}
LR_NONE = {"c-lora": 0.001, "lora": 0.001, "lora-ewc": 0.001, "ewc-dc": 0.001, "dsc-ewc": 0.001,
           "dsc-ewc-dc": 0.001}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_every_method_keeps_its_settings_and_defaults(name):
    assert sorted(method_names()) == sorted(BEFORE)
    got = method_defaults(name, "lora")
    assert got == BEFORE[name] and list(got) == list(BEFORE[name])  # order too: manifests list them so
    for adapter, lrs in (("vera", LR_VERA), (None, LR_NONE)):
        if name == "c-lora" and adapter == "vera":
            continue  # defined on LoRA only (tested below)
        expected = {**BEFORE[name], "lr": lrs.get(name, BEFORE[name]["lr"])}
        assert method_defaults(name, adapter) == expected, adapter
    for key, value in got.items():
        assert type(value) is type(BEFORE[name][key]), key


def test_settings_are_the_documented_fields_of_the_declared_configs():
    for name in method_names():
        cls = get_method(name)
        fields = [f for config in cls.configs for f in dataclasses.fields(config)]
        assert [f.name for f in fields] == list(cls.all_defaults()), name
        for f in fields:
            assert f.metadata["help"] and "\n" not in f.metadata["help"], (name, f.name)
            assert f.metadata["doc"].startswith("docs/DEFAULTS.md#"), (name, f.name)
        assert [config() for config in cls.configs]  # every config builds with its defaults


def test_a_regularised_method_must_declare_the_configs_of_its_switches():
    from conceptstream.methods.config import TrainConfig
    from conceptstream.methods.regularised import RegularisedAdapterMethod

    with pytest.raises(TypeError, match="EWCConfig"):
        type("Broken", (RegularisedAdapterMethod,), {"name": "broken", "ewc_source": "denoise",
                                                    "configs": (TrainConfig,)})


def test_user_values_are_converted_to_the_field_types():
    got = validate_settings("ewc-dc", {"ewc_lambda": "1e-3", "lr": "3e-4", "dc_k": "5", "dc_batch": 2.0,
                                       "fisher_norm": "false", "ewc_gamma": 1, "dc_temperature": 0.02})
    assert got == {"ewc_lambda": 0.001, "lr": 3e-4, "dc_k": 5, "dc_batch": 2, "fisher_norm": False,
                   "ewc_gamma": 1, "dc_temperature": 0.02}
    assert type(got["dc_k"]) is int and type(got["dc_batch"]) is int and got["fisher_norm"] is False
    assert validate_settings("ewc-dc", {"ewc_lambda": "100"})["ewc_lambda"] == 100  # as JSON would read it
    for text, value in (("true", True), ("1", True), ("False", False), ("0", False)):
        assert validate_settings("lora-ewc", {"fisher_norm": text}) == {"fisher_norm": value}
    assert validate_settings("dsc", {"dsc_iters": "0"}) == {"dsc_iters": 0}  # 0 = no consolidation
    assert validate_settings("ewc-dc", {}) == {}
    assert validate_settings("custom-diffusion", {"lr": 1e-5}, adapter=None) == {"lr": 1e-5}


@pytest.mark.parametrize("method,key,value,allowed", [
    ("ewc-dc", "ewc_lambda", "abc", "a number >= 0"),
    ("ewc-dc", "ewc_lambda", "-1", "a number >= 0"),
    ("lora-ewc", "ewc_lambda", -1, "a number >= 0"),
    ("ewc-dc", "ewc_gamma", 1.5, "a number in [0, 1]"),
    ("ewc-dc", "dc_temperature", 0, "a number > 0"),
    ("ewc-dc", "dc_temperature", "nan", "a number > 0"),
    ("ewc-dc", "dc_k", "2.5", "an integer >= 1"),
    ("ewc-dc", "dc_k", 0, "an integer >= 1"),
    ("dsc", "dc_batch", True, "an integer >= 1"),
    ("lora", "lr", "0", "a number > 0"),
    ("lora", "token_lr", "fast", "a number > 0"),
    ("lora", "batch_size", "four", "an integer >= 1"),
    ("lora-ewc", "fisher_passes", 0, "an integer >= 1"),
    ("lora-ewc", "fisher_norm", "maybe", "true or false"),
    ("dsc", "dsc_iters", -1, "an integer >= 0"),
    ("dsc", "dsc_redraw_every", 0, "an integer >= 1"),
    ("c-lora", "clora_lambda", "-1e3", "a number >= 0"),
])
def test_a_bad_value_names_key_value_and_what_is_allowed(method, key, value, allowed):
    with pytest.raises(UserInputError) as info:
        validate_settings(method, {key: value})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"--set {key}={value}: {key} must be {allowed} (")
    assert message.endswith(f"got {value!r}")


def test_an_unknown_setting_names_the_method_and_its_settings():
    with pytest.raises(UserInputError, match=r"^--sweep dc_k=2: method 'lora' has no setting 'dc_k'; it takes: "
                                             r"batch_size, lr, token_lr$"):
        validate_settings("lora", {"dc_k": 2}, flag="--sweep")
    with pytest.raises(UserInputError, match="unknown method 'nope'"):
        validate_settings("nope", {})
    with pytest.raises(UserInputError, match="'c-lora' is defined on lora adapters"):
        validate_settings("c-lora", {}, adapter="vera")


def test_a_saved_method_is_not_rechecked():
    """Saved manifests load as saved: only the names of their settings are checked."""
    method = get_method("ewc-dc")(ewc_lambda=-1, dc_k=2.0)
    assert method.hparams["ewc_lambda"] == -1 and method.hparams["dc_k"] == 2.0
    with pytest.raises(UserInputError, match="no setting"):
        get_method("lora")(dc_k=2)


def test_the_dc_temperature_has_one_home():
    assert DCConfig().temperature == DCScoresConfig().dc_temperature == method_defaults("ewc-dc")["dc_temperature"]
    given, dc = {"dc_temperature": 0.02}, DCConfig(temperature=0.03)
    hparams, resolved = one_dc_temperature("ewc-dc", given, dc)
    assert hparams["dc_temperature"] == resolved.temperature == 0.02  # the method setting wins
    assert given == {"dc_temperature": 0.02} and dc.temperature == 0.03  # inputs untouched
    hparams, resolved = one_dc_temperature("dsc", {}, dc)
    assert hparams == {"dc_temperature": 0.03} and resolved.temperature == 0.03  # else the DC config's
    hparams, resolved = one_dc_temperature("lora", {"lr": 1e-3}, dc)
    assert hparams == {"lr": 1e-3} and resolved is dc  # a method without DC scores keeps the DC config as given


def test_dc_config_from_user_values():
    assert DCConfig.from_user({"temperature": "0.01", "eval_timesteps": "4"}) == DCConfig(temperature=0.01,
                                                                                          eval_timesteps=4)
    for bad, needle in (({"temperature": 0}, "temperature must be a number > 0"),
                        ({"reduction": "max"}, "reduction must be one of mean, sum"),
                        ({"tau": 1}, "no setting 'tau'"), ({"t_min": 900}, "t_min must be below t_max")):
        with pytest.raises(UserInputError, match=needle):
            DCConfig.from_user(bad)


def test_bad_settings_on_a_new_state_exit_2_and_create_nothing(tmp_path, random_model_path, concept_dirs, capsys):
    from conceptstream.cli import main

    state = tmp_path / "state"
    base = ["learn", str(state), "--images", str(concept_dirs[0]), "--model", str(random_model_path), "--steps", "1"]
    for setting, needle in (("ewc_lambda=-1", "--set ewc_lambda=-1: ewc_lambda must be a number >= 0"),
                            ("ewc_lambda=abc", "got 'abc'"), ("dc_k=0", "dc_k must be an integer >= 1")):
        capsys.readouterr()
        assert main([*base, "--method", "ewc-dc", "--set", setting]) == 2
        assert needle in assert_one_line_error(capsys.readouterr().err)
        assert not state.exists()
    for kwargs, needle in (({"hparams": {"ewc_lambda": "abc"}}, "ewc_lambda must be a number >= 0"),
                           ({"hparams": {"lr": 0}}, "lr must be a number > 0"),
                           ({"dc": {"temperature": -1}}, "temperature must be a number > 0")):
        with pytest.raises(UserInputError, match=needle):
            api.learn(state, concept_dirs[0], method="ewc-dc", model=str(random_model_path), steps=1, progress=False,
                      **kwargs)
        assert not state.exists()


def test_a_set_value_is_stored_as_converted(tmp_path, random_model_path, concept_dirs, capsys):
    from conceptstream.cli import main

    state = tmp_path / "state"
    assert main(["learn", str(state), "--images", str(concept_dirs[0]), "--model", str(random_model_path),
                 "--steps", "1", "--method", "lora-ewc", "--set", "ewc_lambda=1e-3", "--set", "fisher_norm=false",
                 "--set", "fisher_passes=1", "--checkpoint-every", "0"]) == 0
    saved = api.info(state)["method"]["hyperparameters"]
    assert saved["ewc_lambda"] == 0.001 and saved["fisher_norm"] is False and saved["fisher_passes"] == 1
