"""jaxclip: gradient clipping for JAX, as composable optax transformations.

Every public name lives here; the modules behind it are private.
`jaxclip.TrainState` needs Flax (``pip install 'jaxclip[flax]'``) and is
imported on first use, so that ``import jaxclip`` works without it.
"""

from typing import TYPE_CHECKING

from jaxclip._adaptive import AdaGCState as AdaGCState
from jaxclip._adaptive import AutoClipState as AutoClipState
from jaxclip._adaptive import QuantileClipState as QuantileClipState
from jaxclip._adaptive import adagc as adagc
from jaxclip._adaptive import autoclip as autoclip
from jaxclip._adaptive import quantile_clip as quantile_clip
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
from jaxclip._clippy import ClippyState as ClippyState
from jaxclip._clippy import clippy as clippy
from jaxclip._dp import dp_epsilon as dp_epsilon
from jaxclip._dp import noisy_mean as noisy_mean
from jaxclip._ghost import ClippedGradInfo as ClippedGradInfo
from jaxclip._ghost import clipped_grad as clipped_grad
from jaxclip._guards import SkipLargeNormState as SkipLargeNormState
from jaxclip._guards import SkipNonFiniteState as SkipNonFiniteState
from jaxclip._guards import SkipOnSpikeState as SkipOnSpikeState
from jaxclip._guards import skip_large_norm as skip_large_norm
from jaxclip._guards import skip_nonfinite as skip_nonfinite
from jaxclip._guards import skip_on_spike as skip_on_spike
from jaxclip._norms import global_norm as global_norm
from jaxclip._norms import unitwise_norm as unitwise_norm
from jaxclip._per_example import per_example_global_norm_clip as per_example_global_norm_clip
from jaxclip._per_example import per_example_layer_norm_clip as per_example_layer_norm_clip
from jaxclip._plot import plot_norms as plot_norms
from jaxclip._recorder import RecordNormsState as RecordNormsState
from jaxclip._recorder import ThresholdSuggestion as ThresholdSuggestion
from jaxclip._recorder import record_norms as record_norms
from jaxclip._recorder import suggest_max_norm as suggest_max_norm
from jaxclip._skip import StateCopyWarning as StateCopyWarning
from jaxclip._spam import SpamClipState as SpamClipState
from jaxclip._spam import spam_clip as spam_clip
from jaxclip._stable_spam import StableSpamClipState as StableSpamClipState
from jaxclip._stable_spam import stable_spam_clip as stable_spam_clip
from jaxclip._stats import stats as stats
from jaxclip._zclip import ZClipState as ZClipState
from jaxclip._zclip import zclip as zclip

if TYPE_CHECKING:  # imported on first use, by __getattr__ below
  from jaxclip._flax import TrainState as TrainState

__version__ = "0.1.0"

__all__ = [
  "AdaGCState",
  "AutoClipState",
  "ClipByGlobalNormState",
  "ClipByValueState",
  "ClippedGradInfo",
  "ClippyState",
  "PerTensorClipState",
  "QuantileClipState",
  "RecordNormsState",
  "SkipLargeNormState",
  "SkipNonFiniteState",
  "SkipOnSpikeState",
  "SpamClipState",
  "StableSpamClipState",
  "StateCopyWarning",
  "ThresholdSuggestion",
  "TrainState",
  "ZClipState",
  "adagc",
  "adaptive_grad_clip",
  "autoclip",
  "clip",
  "clip_by_block_rms",
  "clip_by_global_norm",
  "clip_by_norm",
  "clip_by_value",
  "clipped_grad",
  "clippy",
  "dp_epsilon",
  "global_norm",
  "noisy_mean",
  "per_example_global_norm_clip",
  "per_example_layer_norm_clip",
  "plot_norms",
  "quantile_clip",
  "record_norms",
  "skip_large_norm",
  "skip_nonfinite",
  "skip_on_spike",
  "spam_clip",
  "stable_spam_clip",
  "stats",
  "suggest_max_norm",
  "unitwise_clip",
  "unitwise_norm",
  "zclip",
]


def __getattr__(name: str):
  # TrainState needs Flax, an optional dependency: it is imported on first use.
  if name != "TrainState":
    raise AttributeError(f"module 'jaxclip' has no attribute {name!r}")
  try:
    from jaxclip._flax import TrainState
  except ImportError as e:
    raise ImportError(
      f"jaxclip.TrainState needs Flax, which could not be imported ({e}). Install it with"
      " `pip install 'jaxclip[flax]'`.",
      name=e.name,
    ) from e
  globals()["TrainState"] = TrainState  # later lookups do not come back here
  return TrainState


def __dir__() -> list[str]:
  return sorted({*globals(), "TrainState"})
