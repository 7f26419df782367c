"""Memory Mosaics v1/v2 and a GPT baseline on Megatron-Core."""

import warnings

# megatron-core announces at import time every optional accelerator it does not find (Apex,
# Transformer Engine): on a CPU machine that is all of them, in every tool and on every rank.
# The paths that need them check for them and fail with a message of their own.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(not installed|Falling back).*",
                        category=UserWarning)
