"""Configuration of an exported B'MOJO model for ``trust_remote_code`` loading, built on the installed ``bmojo``.

``AutoConfig.from_pretrained(folder, trust_remote_code=True)`` imports this module from its copy in the folder.
The class is a subclass, not the package's class itself: transformers marks a class loaded this way for saving
with its defining module, so ``save_pretrained`` then writes this small module again rather than a copy of
``bmojo/config.py``.
"""

# transformers' check of a remote module's imports skips those inside ``try``, so the message below is the one
# a user without the package sees.
try:
    from bmojo.config import BmojoConfig as InstalledBmojoConfig
except ModuleNotFoundError as error:
    if error.name != "bmojo":
        raise
    raise ImportError(
        "This model is a B'MOJO model: loading it needs the bmojo package, which is not installed. "
        "Run `pip install bmojo`."
    ) from error


class BmojoConfig(InstalledBmojoConfig):
    """The installed ``bmojo.BmojoConfig``, unchanged."""

    # transformers gives a configuration subclass without an ``__init__`` of its own a generated one that takes
    # the fields as they are; this one keeps the package's defaults and checks.
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
