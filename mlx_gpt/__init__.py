"""mlx-gpt: a character-level GPT in MLX. Importing it changes nothing in the process; the Linux CPU speed-ups are
switched on by ``mlx_gpt.cpu.enable()``."""

from .config import GPTConfig, TrainConfig
from .errors import MlxGptError
from .tokenizer import CharTokenizer

__all__ = ["GPTConfig", "TrainConfig", "CharTokenizer", "MlxGptError"]
__version__ = "0.1.0"
