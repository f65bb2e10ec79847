"""jaxclip: gradient clipping for JAX, as composable optax transformations.

Every public name lives here; the modules behind it are private.
"""

from jaxclip._agc import adaptive_grad_clip as adaptive_grad_clip
from jaxclip._agc import unitwise_clip as unitwise_clip
from jaxclip._clipping import ClipByGlobalNormState as ClipByGlobalNormState
from jaxclip._clipping import ClipByValueState as ClipByValueState
from jaxclip._clipping import PerTensorClipState as PerTensorClipState
from jaxclip._clipping import clip as clip
from jaxclip._clipping import clip_by_block_rms as clip_by_block_rms
from jaxclip._clipping import clip_by_global_norm as clip_by_global_norm
from jaxclip._clipping import clip_by_norm as clip_by_norm
from jaxclip._clipping import clip_by_value as clip_by_value
from jaxclip._norms import global_norm as global_norm
from jaxclip._norms import unitwise_norm as unitwise_norm
from jaxclip._per_example import per_example_global_norm_clip as per_example_global_norm_clip
from jaxclip._per_example import per_example_layer_norm_clip as per_example_layer_norm_clip

__version__ = "0.1.0"

__all__ = [
  "ClipByGlobalNormState",
  "ClipByValueState",
  "PerTensorClipState",
  "adaptive_grad_clip",
  "clip",
  "clip_by_block_rms",
  "clip_by_global_norm",
  "clip_by_norm",
  "clip_by_value",
  "global_norm",
  "per_example_global_norm_clip",
  "per_example_layer_norm_clip",
  "unitwise_clip",
  "unitwise_norm",
]
