"""Modeling code shipped with every Hugging Face export of a heterogeneous model (the
``nemotron-nas`` / ``DeciLMForCausalLM`` format, for which transformers has no class):
``checkpoint/hf_export.py`` copies ``configuration_decilm.py`` and ``modeling_decilm.py``
into the exported directory and names them in ``config.json``'s ``auto_map``, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it. Written for
this project; the two files import only torch and transformers (relative to each other).
"""

from pathlib import Path

#: the files an export ships, and the classes config.json's auto_map names in them
CODE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
CODE_DIR = Path(__file__).parent
