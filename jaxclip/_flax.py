"""Flax integration: a Linen `TrainState` that passes extra arguments to `tx`.

Flax NNX needs nothing from here: `nnx.Optimizer.update(model, grads, **kwargs)`
already passes its keyword arguments on to ``tx.update``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state

from jaxclip import _base

__all__ = ["TrainState"]

# Fields `apply_gradients` itself sets; passing them too would be ambiguous.
_SET_BY_APPLY = ("step", "params", "opt_state")


class TrainState(train_state.TrainState):
  """Flax's Linen `TrainState`, whose `apply_gradients` passes ``loss=`` on to `tx`.

  `flax.training.train_state.TrainState.apply_gradients` calls
  ``tx.update(grads, opt_state, params)`` and nothing more: its keyword
  arguments only replace fields of the state. Transforms that read extra
  arguments, such as the ``loss=`` of `jaxclip.skip_on_spike`, then never see
  them. This subclass is the same dataclass (same fields, same `create`, same
  pytree, so it jits and checkpoints alike) with one change: keyword
  arguments of `apply_gradients` that are not fields of the state are passed
  to ``tx.update`` (of any `tx` whose `update` takes keyword arguments,
  `optax.MultiSteps` included).

  Subclasses with extra fields (``batch_stats``, say) keep working: a keyword
  naming a field still replaces it, as in Flax.

  Examples:
    >>> import flax.linen as nn
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxclip
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
    >>> tx = jaxclip.skip_on_spike(
    ...   optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adamw(1e-2)),
    ...   window=8, min_history=4,
    ... )
    >>> state = jaxclip.TrainState.create(
    ...   apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"], tx=tx
    ... )
    >>> def loss_fn(params):
    ...   return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
    >>> loss, grads = jax.value_and_grad(loss_fn)(state.params)
    >>> state = state.apply_gradients(grads=grads, loss=loss)
    >>> int(state.step), bool(state.opt_state.loss == loss)
    (1, True)
    >>> clip_state = state.opt_state.inner_state[0]  # what clip_by_global_norm recorded
    >>> bool(clip_state.norm > 0)
    True
  """

  def apply_gradients(self, *, grads: optax.Updates, **kwargs: Any) -> TrainState:
    """Applies one step of `tx`, passing extra keyword arguments to ``tx.update``.

    As in Flax: ``step`` grows by one, ``params`` and ``opt_state`` are
    updated with ``tx.update`` and `optax.apply_updates`, and Flax's
    overwrite-with-gradient (fp8) collection is handled the same way.

    Args:
      grads: Gradients with the structure of ``params``.
      **kwargs: Keywords naming a field of the state (other than ``step``,
        ``params`` and ``opt_state``) replace that field, as in Flax; all
        others (``loss=`` for `jaxclip.skip_on_spike`, ``value=`` for
        optax's line searches, ...) are passed to ``tx.update``.
        Transforms that take no extra arguments ignore them.

    Returns:
      The updated state.

    Raises:
      TypeError: If a keyword is ``step``, ``params`` or ``opt_state``,
        which `apply_gradients` sets itself.
    """
    fields = {f.name for f in dataclasses.fields(self)}
    clash = sorted(set(kwargs) & set(_SET_BY_APPLY))
    if clash:
      raise TypeError(
        f"`apply_gradients` sets {', '.join(clash)} itself; do not pass"
        f" {', '.join(f'{name}=' for name in clash)}. Use `state.replace(...)`"
        " to set a field without taking a step."
      )
    replaced = {k: v for k, v in kwargs.items() if k in fields}
    extra_args = {k: v for k, v in kwargs.items() if k not in fields}

    overwrite = OVERWRITE_WITH_GRADIENT in grads
    grads_with_opt = grads["params"] if overwrite else grads
    params_with_opt = self.params["params"] if overwrite else self.params
    tx = _base.with_extra_args(self.tx, "tx")
    updates, new_opt_state = tx.update(
      grads_with_opt, self.opt_state, params_with_opt, **extra_args
    )
    new_params_with_opt = optax.apply_updates(params_with_opt, updates)
    if overwrite:
      new_params = {
        "params": new_params_with_opt,
        OVERWRITE_WITH_GRADIENT: grads[OVERWRITE_WITH_GRADIENT],
      }
    else:
      new_params = new_params_with_opt
    return self.replace(step=self.step + 1, params=new_params, opt_state=new_opt_state, **replaced)
