
import pytest

from finetune.config import ConfigError, LossOn, load_config
from tests.conftest import ROOT


def test_default_config_is_the_seed_recipe():
    config = load_config(ROOT / "configs" / "default.yaml")
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 32, 0.05)
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (config.train.batch_size, config.train.grad_accum, config.train.epochs) == (1, 4, 3)
    assert (config.train.learning_rate, config.train.max_grad_norm, config.train.warmup_ratio) == (2e-4, 0.3, 0.03)
    assert config.quant.quant_type == "nf4" and config.quant.double_quant
    assert config.tokenize.loss_on == LossOn.response


def test_llama2_config_names_the_hub_model():
    config = load_config(ROOT / "configs" / "llama2-7b-chat.yaml")
    assert config.model.base == "meta-llama/Llama-2-7b-chat-hf"
    assert config.train.optim == "paged_adamw_32bit"


def test_dotted_overrides_are_parsed_as_yaml():
    config = load_config(None, ["lora.r=16", "train.learning_rate=1e-4", "tokenize.loss_on=full", "data.topics=[a, b]"])
    assert config.lora.r == 16
    assert config.train.learning_rate == 1e-4
    assert config.tokenize.loss_on == LossOn.full
    assert config.data.topics == ["a", "b"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.rank=4"], "lora.rank: unknown key"),
        (["train.learning_rate=-1"], "train.learning_rate: Input should be greater than 0"),
        (["train.epochs=many"], "train.epochs: Input should be a valid number"),
        (["tokenize.loss_on=prompt"], "tokenize.loss_on: Input should be 'response' or 'full'"),
        (["tokenize.template=no placeholder"], "tokenize.template: Value error, must contain the placeholder"),
        (["lora"], "expected key=value"),
        (["lora=3", "lora.r=1"], "'lora' is a value, not a section"),
        (["lora.r.x=1"], "lora.r: Input should be a valid integer"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, overrides)


def test_bad_config_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)
