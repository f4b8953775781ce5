"""Loading, saving and converting checkpoints, with errors that say what is wrong.

One module per folder format, each with its detection and loading, tried in order (engine/checkpoint/loading.py):

* ``ufb``: ours, ``ufb_config.json`` + ``model.safetensors`` + tokenizer files; :func:`save_model` writes it and it
  round-trips exactly.
* ``crammed``: the published crammedBERT(-FFF) checkpoints (UltraFastBERT-1x11-long), into the ``crammed`` layout.
* ``hf_bert``: Hugging Face BERT folders, as the dense ``bert`` layout; :func:`convert_hf_bert` (convert.py) turns
  such a teacher into an FFF student.

Every failure is a :class:`CheckpointError` naming the file and the problem.
"""

from engine.checkpoint.common import WEIGHTS_FILE, CheckpointError, LoadedModel, read_safetensors
from engine.checkpoint.convert import convert_hf_bert
from engine.checkpoint.loading import FORMATS, detect_format, load_model
from engine.checkpoint.ufb import SAVE_DTYPES, save_model

__all__ = [
    "FORMATS",
    "SAVE_DTYPES",
    "WEIGHTS_FILE",
    "CheckpointError",
    "LoadedModel",
    "convert_hf_bert",
    "detect_format",
    "load_model",
    "read_safetensors",
    "save_model",
]
