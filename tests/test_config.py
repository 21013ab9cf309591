"""Hydra composition of every config group option, the experiments, and schema errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import itertools
from importlib.resources import files

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from bmlseg import config
from bmlseg.config import register_configs
from bmlseg.labels.methods import resolve_options
from bmlseg.losses import MaskLoss
from bmlseg.report import PRESET_ORDER

CONF = files("bmlseg.conf")
TABLE1_LOSSES = list(PRESET_ORDER)  # the rows of the paper's Table I, in order


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (hydra_plugins) is absent too
        return False


def options(group: str) -> list[str]:
    return sorted(
        item.name[: -len(".yaml")]
        for item in CONF.joinpath(group).iterdir()
        if item.name.endswith(".yaml")
    )


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    register_configs()
    with initialize_config_module("bmlseg.conf", version_base="1.3"):
        yield


def test_train_defaults_compose_to_the_documented_run():
    cfg = compose("train")
    assert cfg.data.root == "data/synthetic"
    assert cfg.labels.method == "kimriss"
    assert cfg.model.name == "imaskrcnn_r18_narrow"
    assert cfg.loss.name == "apl_soft_bce"
    assert cfg.train.name == "cpu"
    assert cfg.binary_labels == "kimriss_hard"
    assert cfg.model.image_size == cfg.data.crop_size


@pytest.mark.parametrize(
    "group", ["data", "labels", "model", "loss", "train"], ids=lambda group: group
)
def test_every_option_of_every_group_composes(group):
    found = options(group)
    assert found, f"conf/{group} holds no option"
    for option in found:
        cfg = compose("train", overrides=[f"{group}={option}"])
        # Resolving everything catches bad interpolations and values outside the schema.
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        if group in ("model", "loss", "train"):
            assert cfg[group].name == option


def test_loss_presets_pick_the_label_kind_of_table1():
    kinds = {
        name: compose("train", overrides=[f"loss={name}"]).loss.label_kind.value
        for name in TABLE1_LOSSES
    }
    assert kinds == {
        name: "binary" if name.startswith(("baseline", "apl_binary")) else "soft"
        for name in TABLE1_LOSSES
    }


def test_table1_experiment_sweeps_all_eight_losses_at_paper_scale():
    cfg = compose("train", overrides=["experiment=table1"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params.loss.split(",") == TABLE1_LOSSES
    assert set(TABLE1_LOSSES) <= set(options("loss"))
    assert cfg.train.name == "paper"
    assert (cfg.train.lr, cfg.train.steps, cfg.train.batch_size) == (1e-3, 200 * 200, 2)
    assert cfg.model.backbone == "resnet50"
    assert cfg.data.crop_size == cfg.model.image_size == 320


def sweep_runs(cfg) -> list[dict[str, str]]:
    """The runs of a composed multirun config: the product of its sweeper params."""
    parsed = OverridesParser.create().parse_overrides(
        [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    )
    choices = [[(o.key_or_group, str(v)) for v in o.sweep_string_iterator()] for o in parsed]
    return [dict(run) for run in itertools.product(*choices)]


def test_demo_experiment_compares_oracle_baseline_and_apl_soft_labels():
    cfg = compose("train", overrides=["experiment=demo"], return_hydra_config=True)
    runs = sweep_runs(cfg)
    assert [run["loss"] for run in runs] == ["truth_bce", "baseline_bce", "apl_soft_bce"]
    assert (cfg.train.name, cfg.model.name) == ("cpu", "imaskrcnn_r18_narrow")


def test_phantom_table1_expands_to_six_rows_times_three_seeds_resumable():
    cfg = compose("train", overrides=["experiment=phantom_table1"], return_hydra_config=True)
    runs = sweep_runs(cfg)
    rows = ["truth_bce", "baseline_bce", "soft_baseline", "apl_binary", "apl_soft", "apl_soft_bce"]
    assert len(runs) == 18
    assert {(run["loss"], run["seed"]) for run in runs} == {
        (row, seed) for row in rows for seed in ("0", "1", "2")
    }
    assert cfg.train.resume is True
    # One fixed folder per run, so a second start finds it.
    assert cfg.hydra.sweep.dir == "multirun/phantom_table1"
    assert cfg.hydra.sweep.subdir == f"{cfg.loss.name}_seed{cfg.seed}"
    assert (cfg.train.name, cfg.model.name) == ("cpu", "imaskrcnn_r18_narrow")
    kinds = {row: compose("train", overrides=[f"loss={row}"]).loss.label_kind.value for row in rows}
    assert kinds["truth_bce"] == "truth"


def test_phantom_losses_runs_the_field_losses_with_the_table1_recipe_resumable():
    cfg = compose("train", overrides=["experiment=phantom_losses"], return_hydra_config=True)
    table1 = compose("train", overrides=["experiment=phantom_table1"], return_hydra_config=True)
    runs = sweep_runs(cfg)
    rows = ["gce", "ngce_nrce", "sce", "anl", "tloss", "dice_soft", "dice_sce", "boxinst"]
    assert {(run["loss"], run["seed"]) for run in runs} == {
        (row, seed) for row in rows for seed in ("0", "1", "2")
    }
    assert cfg.hydra.sweep.dir == "multirun/phantom_losses"
    # The same recipe and data settings as the runs it is paired with.
    for group in ("model", "train", "data"):
        assert cfg[group] == table1[group], group
    assert compose("train", overrides=["loss=boxinst"]).loss.label_kind.value == "boxes"


@pytest.mark.skipif(
    not installed("hydra_plugins.hydra_optuna_sweeper"),
    reason="hydra-optuna-sweeper is not installed (extra [optuna])",
)
def test_optuna_experiment_composes():
    cfg = compose("train", overrides=["experiment=optuna_loss"], return_hydra_config=True)
    assert set(cfg.hydra.sweeper.params) == {"loss.bce", "loss.sce", "loss.rce"}


@pytest.mark.skipif(
    not installed("hydra_plugins.hydra_submitit_launcher"),
    reason="hydra-submitit-launcher is not installed (extra [slurm])",
)
def test_slurm_launcher_composes():
    cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == 1


@pytest.mark.parametrize(
    "override",
    ["loss.bcee=1", "train.amp=fp61", "train.steps=many", "data.crop=64", "seed=one"],
)
def test_a_mistyped_override_is_an_error(override):
    with pytest.raises(ConfigCompositionException):
        compose("train", overrides=[override])


def test_an_unknown_option_is_an_error():
    with pytest.raises(MissingConfigException, match="loss/apl_sofft"):
        compose("train", overrides=["loss=apl_sofft"])


def test_loss_weight_overrides_keep_their_type():
    cfg = compose("train", overrides=["loss=apl_binary", "loss.bce=2", "loss.rce=0"])
    assert (cfg.loss.bce, cfg.loss.rce) == (2.0, 0.0)
    assert isinstance(cfg.loss.bce, float)


def test_tool_configs_compose_and_require_their_inputs():
    evaluate = compose("evaluate", overrides=["checkpoint=run/checkpoints/best.pt"])
    assert evaluate.split == "test" and evaluate.data.root is None
    labels = compose("labels", overrides=["labels=staple"])
    assert labels.labels.method == "staple" and labels.evaluate is False
    synth = compose("synth", overrides=["n_subjects=2"])
    assert (synth.n_subjects, synth.preset) == (2, "small")
    with pytest.raises(MissingMandatoryValue):
        _ = compose("evaluate").checkpoint


# --- each value written once --------------------------------------------------------------------

# The schema fields whose defaults belong to the code that uses them; every other schema field is
# MISSING, so that its value is written in one YAML file only.
OWNED_BY_CODE = {
    (config.DataConfig, "instances"),
    *((config.LossConfig, name) for name in inspect.signature(MaskLoss).parameters),
}
SCHEMAS = [
    config.DataConfig,
    config.LabelsConfig,
    config.ModelConfig,
    config.LossConfig,
    config.TrainConfig,
    config.TrainApp,
    config.EvalData,
    config.EvalApp,
    config.LabelsApp,
    config.SynthApp,
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda schema: schema.__name__)
def test_schema_fields_are_missing_unless_the_code_owns_their_default(schema):
    for field in dataclasses.fields(schema):
        has_default = field.default is not dataclasses.MISSING and field.default != MISSING
        if (schema, field.name) in OWNED_BY_CODE:
            continue
        nested = field.default_factory is not dataclasses.MISSING
        assert not has_default or nested, f"{schema.__name__}.{field.name} = {field.default!r}"
        if nested:
            assert dataclasses.is_dataclass(field.default_factory), (
                f"{schema.__name__}.{field.name}"
            )


def test_loss_schema_defaults_are_mask_loss_defaults():
    for name, parameter in inspect.signature(MaskLoss).parameters.items():
        assert getattr(config.LossConfig, name) == parameter.default, name


@pytest.mark.parametrize("path", sorted(CONF.joinpath("loss").iterdir(), key=str), ids=str)
def test_no_loss_preset_restates_a_mask_loss_default(path):
    if not path.name.endswith(".yaml"):
        pytest.skip("not a preset")
    defaults = {name: p.default for name, p in inspect.signature(MaskLoss).parameters.items()}
    preset = OmegaConf.to_container(OmegaConf.load(str(path)))
    restated = {
        key: value
        for key, value in preset.items()
        if key in defaults and value == defaults[key] and type(value) is type(defaults[key])
    }
    assert not restated, f"{path.name} restates MaskLoss's defaults {restated}"


def _own_values(group: str, name: str) -> dict:
    values = OmegaConf.to_container(OmegaConf.load(str(CONF.joinpath(group, f"{name}.yaml"))))
    values.pop("defaults", None)
    return values


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("group", ["model", "train", "labels"])
def test_no_variant_restates_what_it_inherits(group):
    for name in options(group):
        raw = OmegaConf.to_container(OmegaConf.load(str(CONF.joinpath(group, f"{name}.yaml"))))
        parents = [entry for entry in raw.get("defaults", []) if entry != "_self_"]
        for parent in parents:
            inherited = _flatten(_own_values(group, parent))
            own = _flatten(_own_values(group, name))
            restated = {key for key, value in own.items() if inherited.get(key) == value}
            assert not restated, f"{group}/{name}.yaml restates {sorted(restated)} of {parent}"


@pytest.mark.parametrize("name", options("labels"))
def test_label_options_in_yaml_are_the_methods_defaults(name):
    """Label options are listed in their YAML, so that ``labels.options.x=...`` composes (Hydra
    refuses new keys without ``+``); they must say what the method's own defaults say."""
    cfg = compose("train", overrides=[f"labels={name}"])
    listed = OmegaConf.to_container(cfg.labels.options, resolve=True)
    defaults = resolve_options(cfg.labels.method)
    assert set(listed) == set(defaults), name
    # kimriss_hard's threshold is the instance threshold by design, not a copy of a default.
    differing = {k for k in listed if listed[k] != defaults[k] and k != "threshold"}
    assert not differing, f"labels/{name}.yaml: {sorted(differing)} differ from the defaults"
