"""reformer_rt.models: the PyTorch Reformer (HF-identical numerics), its config, checkpoint I/O and the LSH op.

This package imports torch and safetensors only; export, kernels and runtimes build on it, never the reverse.
"""

from .config import DEFAULT_HASH_SEED, ReformerConfig, resolve_num_buckets
from .errors import CheckpointError, ConfigError, InputError, InputTypeError, ReformerError
from .heads import (
    Reformer, ReformerForQuestionAnswering, ReformerForSequenceClassification, Task, load_pretrained, task_of,
)
from .lsh import OP_ID, OP_VERSION, LSHAttrs, lsh_attention_reference, make_rotations
from .lsh_op import lsh_attention
from .modeling import ReformerLM, ReformerModel

__all__ = [
    "DEFAULT_HASH_SEED", "OP_ID", "OP_VERSION", "CheckpointError", "ConfigError", "InputError", "InputTypeError",
    "LSHAttrs", "Reformer", "ReformerConfig", "ReformerError", "ReformerForQuestionAnswering",
    "ReformerForSequenceClassification", "ReformerLM", "ReformerModel", "Task", "load_pretrained", "lsh_attention",
    "lsh_attention_reference", "make_rotations", "resolve_num_buckets", "task_of",
]
