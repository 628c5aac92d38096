"""bmojo: B'MOJO hybrid state-space models (eidetic + fading memory), trained on Trainium or PyTorch.

Importing the package registers ``model_type="bmojo"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``, so exported folders load with plain ``transformers`` calls. Processes that never
import it load them with ``trust_remote_code=True`` through the modules an export carries (``bmojo.remote``).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from bmojo.config import BmojoConfig
from bmojo.model import BmojoCache, BmojoForCausalLM, BmojoModel

AutoConfig.register("bmojo", BmojoConfig, exist_ok=True)
AutoModel.register(BmojoConfig, BmojoModel, exist_ok=True)
AutoModelForCausalLM.register(BmojoConfig, BmojoForCausalLM, exist_ok=True)

__all__ = ["BmojoCache", "BmojoConfig", "BmojoForCausalLM", "BmojoModel"]
__version__ = "0.1.0"
