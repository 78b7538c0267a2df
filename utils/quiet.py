"""What the libraries print on their own stays off the user's terminal; what this project says stays on it.

The field's libraries log and warn at import and on their own deprecation paths: bitsandbytes' missing optional CPU
kernels on every import, transformers' missing torchvision, diffusers' lists of float32 modules, torch's notes
about its own defaults. A user of this project can act on none of it. It is filtered by logger and by warning
category and module, never by sentence, so that the next release's wording is covered too; errors still show, and
TRANSFORMERS_VERBOSITY / DIFFUSERS_VERBOSITY set by the user win.

bitsandbytes (0.8 s and a log line at import, which peft triggers by importing it whenever it is installed) is
hidden from imports until `import_bitsandbytes()` asks for it: --use_8bit_adam and --base_quantization do.
"""

import logging
import os
import sys
import warnings

DEPENDENCIES = ("torch", "diffusers", "transformers", "accelerate", "peft", "huggingface_hub", "bitsandbytes")
# Where a dependency's own code warns (the module a warning is attributed to): deprecations and advice meant for
# its developers. A warning attributed to this project's code (a deprecated call of ours) still shows.
QUIET_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, UserWarning)
# The libraries that configure their own loggers read these once, at import.
VERBOSITY_VARIABLES = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")
DEFERRED_MODULE = "bitsandbytes"


def install() -> None:
    """Quiet the dependencies for this process and the processes it starts (the environment carries on)."""
    for variable in VERBOSITY_VARIABLES:
        os.environ.setdefault(variable, "error")
    for name in DEPENDENCIES:
        logging.getLogger(name).setLevel(logging.ERROR)  # those that log through plain loggers
    dependency_modules = rf"({'|'.join(DEPENDENCIES)})(\.|$)"
    for category in QUIET_CATEGORIES:
        warnings.filterwarnings("ignore", category=category, module=dependency_modules)
    if DEFERRED_MODULE not in sys.modules:
        sys.modules[DEFERRED_MODULE] = None  # `import bitsandbytes` fails as if absent; peft and transformers skip it


def hide_loading_bars() -> None:
    """transformers' "Loading weights" and diffusers' "Loading pipeline components" bars, one per model loaded,
    off; downloads keep their progress bars (huggingface_hub's own)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def bitsandbytes_installed() -> bool:
    """Whether bitsandbytes can be imported, asked without importing it (its metadata)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(DEFERRED_MODULE)
    except PackageNotFoundError:
        return False
    return True


def import_bitsandbytes(needed_by: str = "--use_8bit_adam"):
    """bitsandbytes, imported now (quietly): the one way this project loads it; `needed_by` names the flag that
    asked, for the message when it cannot load."""
    if sys.modules.get(DEFERRED_MODULE, False) is None:
        del sys.modules[DEFERRED_MODULE]
    try:
        import bitsandbytes
    except Exception as error:  # an ImportError, or a broken native library raising something else
        from utils.errors import UserError

        raise UserError(f"{needed_by} needs bitsandbytes, which cannot be imported here ({type(error).__name__}: "
                        f"{error}): pip install bitsandbytes") from None
    return bitsandbytes
