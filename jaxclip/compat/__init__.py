"""Exact ports of TensorFlow's, PyTorch's and Keras' gradient clipping.

* `jaxclip.compat.tf`: ``tf.clip_by_value``, ``tf.clip_by_norm``,
  ``tf.linalg.global_norm`` and ``tf.clip_by_global_norm``.
* `jaxclip.compat.torch`: ``torch.nn.utils.get_total_norm``,
  ``clip_grads_with_norm_``, ``clip_grad_norm_`` and ``clip_grad_value_``.
* `jaxclip.compat.keras`: ``with_clipping``, the ``clipnorm``, ``clipvalue``
  and ``global_clipnorm`` arguments of Keras 3 optimizers.

These reproduce each library's arithmetic, quirks included, so that a ported
model gets the same numbers. For new code prefer the jaxclip transforms
(`jaxclip.clip_by_global_norm` etc.); ``docs/porting.md`` compares them.
Neither TensorFlow, PyTorch nor Keras is needed to use these modules.
"""

from jaxclip.compat import keras as keras
from jaxclip.compat import tf as tf
from jaxclip.compat import torch as torch

__all__ = ["keras", "tf", "torch"]
