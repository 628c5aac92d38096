"""The modules an export carries for ``trust_remote_code`` loading (named by ``auto_map`` in its config.json).

``configuration_bmojo.py`` and ``modeling_bmojo.py`` are copied as they are into every exported folder. They
hold no architecture: they take the classes from the installed ``bmojo``, so an export keeps loading with the
package's code (fixes included) and a process that never imported ``bmojo`` can still load it through the Auto
classes or any tool that loads models by path.
"""

import json
import shutil
from pathlib import Path

REMOTE_CODE_FOLDER = Path(__file__).parent
REMOTE_CODE_FILES = ("configuration_bmojo.py", "modeling_bmojo.py")
AUTO_MAP = {
    "AutoConfig": "configuration_bmojo.BmojoConfig",
    "AutoModel": "modeling_bmojo.BmojoModel",
    "AutoModelForCausalLM": "modeling_bmojo.BmojoForCausalLM",
}


def add_remote_code(folder: str | Path) -> None:
    """Copy the remote-code modules into a saved model ``folder`` and point its config.json's ``auto_map`` at them."""
    folder = Path(folder)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_FOLDER / name, folder / name)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = AUTO_MAP
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
