"""Model classes of an exported B'MOJO model for ``trust_remote_code`` loading, built on the installed ``bmojo``.

``AutoModel`` / ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` import this module from
its copy in the folder. As in ``configuration_bmojo``, the classes are subclasses so that ``save_pretrained``
writes these modules again; each names the remote configuration class, which transformers requires of a model
class it registers for that configuration.
"""

from transformers import GenerationMixin

# Without the package installed this module never runs: transformers' check of its imports stops first, naming
# bmojo (and AutoConfig has already stopped at configuration_bmojo's message).
from bmojo.model import BmojoForCausalLM as InstalledBmojoForCausalLM
from bmojo.model import BmojoModel as InstalledBmojoModel

from .configuration_bmojo import BmojoConfig


class BmojoModel(InstalledBmojoModel):
    """The installed ``bmojo.BmojoModel``, unchanged."""

    config_class = BmojoConfig


# GenerationMixin among the direct bases: transformers otherwise wraps a remote class that defines its own
# ``prepare_inputs_for_generation`` in one more generated class.
class BmojoForCausalLM(InstalledBmojoForCausalLM, GenerationMixin):
    """The installed ``bmojo.BmojoForCausalLM``, unchanged."""

    config_class = BmojoConfig
