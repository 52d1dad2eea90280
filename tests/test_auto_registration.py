"""``import mtl_plugins`` alone lets ``AutoConfig``/``AutoModel`` load multi-task checkpoints, without
importing transformers itself. Each scenario runs in a fresh interpreter."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_hub_fixtures import TEXT_TASKS, bert_config
from transformers.models.auto import configuration_auto

from mtl_plugins import auto_registration
from mtl_plugins.hub import MultiTaskConfig, MultiTaskModel


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh offline interpreter; the caller checks the exit status."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny text MultiTaskModel saved once for the module."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(), tasks=TEXT_TASKS[:2])).save_pretrained(path)
    return str(path)


def test_import_does_not_import_transformers(tmp_path):
    code = """
        import sys, mtl_plugins
        print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' or m == 'mtl_plugins.hub'))
    """
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("before, after", [
    ("import mtl_plugins", "from transformers import AutoModel"),
    ("from transformers import AutoConfig, AutoModel", "import mtl_plugins"),
    # modeling_utils imports configuration_auto halfway through its own execution
    ("import mtl_plugins", "from transformers import AutoModel, BertModel, PreTrainedModel"),
], ids=["mtl_plugins-first", "transformers-first", "modeling_utils-first"])
def test_auto_model_loads_checkpoint(checkpoint, tmp_path, before, after):
    code = f"""
        {before}
        {after}
        import sys
        hub_imported_early = 'mtl_plugins.hub' in sys.modules
        model = AutoModel.from_pretrained({checkpoint!r})
        from mtl_plugins.hub import MultiTaskModel
        print(hub_imported_early, type(model) is MultiTaskModel, sorted(model.config.task_names))
    """
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "False True ['score', 'sentiment']"


def test_auto_config_alone_loads_and_replaces_the_stand_in(checkpoint, tmp_path):
    code = f"""
        import mtl_plugins
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        stand_in = CONFIG_MAPPING['mtl_multitask']
        config = AutoConfig.from_pretrained({checkpoint!r})
        from mtl_plugins.hub import MultiTaskConfig
        print(stand_in.__name__, type(config) is MultiTaskConfig, CONFIG_MAPPING['mtl_multitask'] is MultiTaskConfig)
    """
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "LazyMultiTaskConfig True True"


def test_load_fails_without_mtl_plugins(checkpoint, tmp_path):
    result = run_python(f"from transformers import AutoModel; AutoModel.from_pretrained({checkpoint!r})", tmp_path)
    assert result.returncode != 0
    assert "mtl_multitask" in result.stderr


def test_registration_is_idempotent_and_keeps_the_real_class():
    auto_registration.install()
    auto_registration.install()
    finders = [f for f in sys.meta_path if type(f).__name__ == "ConfigAutoFinder"]
    assert len(finders) == 1
    auto_registration.register(configuration_auto)
    assert configuration_auto.CONFIG_MAPPING[auto_registration.MODEL_TYPE] is MultiTaskConfig
    assert auto_registration.MODEL_TYPE == MultiTaskConfig.model_type


def test_stand_in_forwards_to_the_real_class():
    stand_in = auto_registration.LazyMultiTaskConfig
    config = stand_in(backbone_config=bert_config(), tasks=TEXT_TASKS[:1])
    assert type(config) is MultiTaskConfig and isinstance(config, stand_in)
    assert stand_in.model_type == "mtl_multitask" and stand_in.from_dict == MultiTaskConfig.from_dict
