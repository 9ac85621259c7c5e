"""mlx-gpt: a character-level GPT in MLX."""

from . import backend

# Before anything imports mlx.core: see backend.py for why.
backend.load_blas()
backend.tune_cpu_jit()
backend.widen_eval_order()  # before MLX's first evaluation

from .config import GPTConfig, TrainConfig  # noqa: E402
from .errors import MlxGptError  # noqa: E402
from .tokenizer import CharTokenizer  # noqa: E402

__all__ = ["GPTConfig", "TrainConfig", "CharTokenizer", "MlxGptError", "backend"]
__version__ = "0.1.0"
