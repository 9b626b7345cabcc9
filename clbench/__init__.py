"""clbench: continual-learning benchmarks for prompt-based methods on frozen transformers."""

import warnings

# avalanche imports qpsolvers, which warns on import that it found no QP solver; no clbench
# strategy uses a QP solver (that is GEM's), so the warning would only be noise.
warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)

__version__ = "0.1.0"

from clbench import logs as _logs  # noqa: E402,F401  (installs the clbench log handler)

# entry points for Avalanche scripts; clbench.api imports torch only when they are called
from clbench.api import create_encoder, create_scenario, create_strategy  # noqa: E402

__all__ = ["__version__", "create_encoder", "create_scenario", "create_strategy"]
