"""Hub-ready multi-task models: ``MultiTaskConfig`` and ``MultiTaskModel``.

Importing this module registers them with ``AutoConfig`` and ``AutoModel`` (model type
``mtl_multitask``) and registers the recipe model ``hub_multitask`` (``mtl_plugins.models``).
Plain ``import mtl_plugins`` is enough for ``AutoConfig``/``AutoModel.from_pretrained`` to load saved
multi-task checkpoints, whether transformers is imported before or after it: it registers
a stand-in with ``AutoConfig`` that imports this module on first use (``mtl_plugins.auto_registration``).
To load without ``mtl_plugins`` imported at all, call
``MultiTaskConfig.register_for_auto_class()`` and ``MultiTaskModel.register_for_auto_class("AutoModel")``
before ``save_pretrained``/``push_to_hub``: the code is saved with the checkpoint and
``AutoModel.from_pretrained(..., trust_remote_code=True)`` loads it (the saved code imports the
losses and task connections of ``mtl_plugins``, so the ``mtl-plugins`` package must be installed).
"""

from transformers import AutoConfig, AutoModel

from mtl_plugins.pretrained import resolve_pretrained

from .card import build_model_card
from .configuration import MultiTaskConfig
from .heads import HEAD_KINDS
from .modeling import MultiTaskModel, MultiTaskModelOutput
from .recipe import hub_multitask  # registers the recipe model ``hub_multitask``

AutoConfig.register(MultiTaskConfig.model_type, MultiTaskConfig, exist_ok=True)
AutoModel.register(MultiTaskConfig, MultiTaskModel, exist_ok=True)

__all__ = ["HEAD_KINDS", "MultiTaskConfig", "MultiTaskModel", "MultiTaskModelOutput", "build_model_card",
           "hub_multitask", "resolve_pretrained"]
