import pytest

from altgrad.training.config import ConfigError, load_config


def test_default_config_loads_and_overrides_apply():
    config = load_config(None, ["quant.weight=E3M4", "train.max_steps=7", "optimizer.betas=[0.8, 0.9]"])
    assert config.quant.weight == "E3M4"
    assert config.train.max_steps == 7
    assert config.optimizer.betas == (0.8, 0.9)
    assert str(config.run_dir) == "runs/default"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("quant.weight=E9M9", "config key 'quant.weight': unknown format 'E9M9'; allowed: none, E0M7"),
        ("train.lrr=0.1", "config key 'train.lrr': unknown key; allowed keys here: max_steps"),
        ("train.precision=fp8", "config key 'train.precision': got 'fp8'"),
        ("model.n_embd=wide", "config key 'model.n_embd'"),
        ("optimizer.name=lion", "config key 'optimizer.name': got 'lion'"),
        ("quant.rules=[{pattern: lm_head, wieght: E4M3}]", "config key 'quant.rules.0.wieght': unknown key"),
        ("model.n_head=3", "n_embd (128) must be divisible by n_head (3)"),
        ("bogus=1", "config key 'bogus': unknown key; allowed keys here: name, seed"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(override, named):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert named in str(error.value)


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["train.lr"])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_yaml_file_round_trip(tmp_path):
    from altgrad.training.config import save_config

    config = load_config(None, ["name=x", "quant.rules=[{pattern: lm_head, weight: none}]"])
    save_config(config, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == config
    assert again.quant.rules[0].weight == "none"


@pytest.mark.parametrize(
    ("overrides", "lr", "storage"),
    [
        (["optimizer.name=adamw", "train.lr=0.002"], 0.002, None),
        (["optimizer.name=manifold_adamw", "optimizer.weight_storage=quantized"], 1.0, "quantized"),
        (["optimizer.name=manifold_adamw", "optimizer.manifold_mode=grad_scale", "train.lr=0.002"], 0.002,
         None),
        (["optimizer.name=grid", "optimizer.weight_storage=fp32"], 1.0, "none"),
        (["optimizer.name=madam", "optimizer.weight_storage=bfloat16"], 0.01, "bfloat16"),
        (["optimizer.name=madam", "optimizer.lr=0.1", "optimizer.weight_storage=E5M2"], 0.1, "E5M2"),
    ],
)
def test_optimizer_lr_defaults_to_its_own_unit_and_storage_is_named(overrides, lr, storage):
    config = load_config(None, overrides)
    assert config.optimizer_lr == lr and config.optimizer.weight_storage == storage


def test_unknown_weight_storage_names_the_key():
    with pytest.raises(ConfigError, match="key .optimizer.weight_storage.: unknown format .quantised."):
        load_config(None, ["optimizer.weight_storage=quantised"])
