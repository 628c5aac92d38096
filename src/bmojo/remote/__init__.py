"""The modules an export carries for ``trust_remote_code`` loading (named by ``auto_map`` in its config.json).

``configuration_bmojo.py`` and ``modeling_bmojo.py`` are copied as they are into every exported folder. They
hold no architecture: they take the classes from the installed ``bmojo``, so an export keeps loading with the
package's code (fixes included) and a process that never imported ``bmojo`` can still load it through the Auto
classes or any tool that loads models by path.
"""

from pathlib import Path

REMOTE_CODE_FOLDER = Path(__file__).parent
REMOTE_CODE_FILES = ("configuration_bmojo.py", "modeling_bmojo.py")
AUTO_MAP = {
    "AutoConfig": "configuration_bmojo.BmojoConfig",
    "AutoModel": "modeling_bmojo.BmojoModel",
    "AutoModelForCausalLM": "modeling_bmojo.BmojoForCausalLM",
}
