"""Per-example clipped gradients of any JAX loss, for DP-SGD: `clipped_grad`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclip import _base, _ghost_plan, _ghost_trace, _norms, _validate
from jaxclip._ghost_run import GhostPass

METHODS = ("auto", "ghost", "vmap")


class ClippedGradInfo(NamedTuple):
  """What `clipped_grad` measured, per example of the batch.

  Attributes:
    losses: ``[B]`` the loss of each example, as `loss_fn` computed it.
    norms: ``[B]``, the global L2 norm of each example's gradient (over
      every parameter) before clipping; inf or NaN where the gradient is not
      finite. Float32 (float64 with `method="vmap"` and float64 parameters).
    num_clipped: int32, the number of examples scaled down, non-finite ones
      included.
    num_nonfinite: int32, the number of examples whose loss or gradient is
      not finite; they contribute zero to the sum.
    aux: With ``has_aux=True``, the aux `loss_fn` returned for each example
      alone (a batch of one): leaves whose leading axis has size 1 are
      concatenated along it into ``[B, ...]``, as `loss_fn` would return them
      for the whole batch; other leaves (scalars, such as a mean) are stacked
      on a new leading axis of size B. None otherwise.
  """

  losses: jax.Array
  norms: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array
  aux: Any


class _Stats(NamedTuple):
  losses: jax.Array
  norms: jax.Array
  clipped: jax.Array
  nonfinite: jax.Array
  aux: Any


def _is_array(x: object) -> bool:
  return isinstance(x, jax.Array | np.ndarray | np.generic)


class _Call:
  """One call's inputs, split into differentiated parameters (floating array
  leaves of `params`), other array inputs, and static leaves."""

  def __init__(
    self, loss_fn: Callable[..., Any], has_aux: bool, params: Any, batch: Any, args: tuple
  ):
    self.loss_fn, self.has_aux = loss_fn, has_aux
    p_leaves, self.p_def = jax.tree.flatten(params)
    self.p_kind = ["d" if _norms.is_inexact(x) else "r" if _is_array(x) else "s" for x in p_leaves]
    self.p_static = [x if k == "s" else None for x, k in zip(p_leaves, self.p_kind)]
    self.diff = [x for x, k in zip(p_leaves, self.p_kind) if k == "d"]
    self.rest = [x for x, k in zip(p_leaves, self.p_kind) if k == "r"]
    if not self.diff:
      _refuse_nothing_to_differentiate(params)
    self.examples, self.b_def, self.batch_size = _batch_leaves(batch)
    _check_varying(params, self.diff, self.examples)
    a_leaves, self.a_def = jax.tree.flatten(args)
    self.a_static = [None if _is_array(x) else x for x in a_leaves]
    self.extra = [x for x in a_leaves if _is_array(x)]

  def params(self, diff: list, rest: list) -> Any:
    it = {"d": iter(diff), "r": iter(rest)}
    leaves = [s if k == "s" else next(it[k]) for s, k in zip(self.p_static, self.p_kind)]
    return jax.tree.unflatten(self.p_def, leaves)

  def grads_tree(self, sums: list) -> Any:
    it = iter(sums)
    return jax.tree.unflatten(self.p_def, [next(it) if k == "d" else None for k in self.p_kind])

  def single(self, diff: list, rest: list, example: list, extra: list) -> tuple:
    """The loss (a scalar) and aux of one example, as a batch of one."""
    it = iter(extra)
    args = jax.tree.unflatten(self.a_def, [next(it) if s is None else s for s in self.a_static])
    batch = jax.tree.unflatten(self.b_def, [x[None] for x in example])
    out = self.loss_fn(self.params(diff, rest), batch, *args)
    losses, aux = _split_output(out, self.has_aux)
    _check_losses(losses, self.batch_size)
    return losses[0], aux


def _refuse_nothing_to_differentiate(params: Any) -> None:
  """Raises a ValueError for `params` without a floating-point array.

  Every gradient would be None and every norm 0: the model silently
  untrained."""
  numbers = [
    jax.tree_util.keystr(path)
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
    if isinstance(x, float | complex)
  ]
  hint = (
    f" Python numbers are held fixed, not differentiated ({', '.join(numbers[:5])}"
    f"{', ...' if len(numbers) > 5 else ''}): pass them as arrays, e.g."
    " `jax.tree.map(jnp.asarray, params)`."
    if numbers
    else ""
  )
  raise ValueError(
    "`params` holds no floating-point array to differentiate, so every gradient would be"
    f" None and every per-example norm 0.{hint}"
  )


def _check_varying(params: Any, diff: list, examples: list) -> None:
  """Inside `shard_map`: raises if the batch varies over a mesh axis that a
  parameter does not. JAX then sums the gradient with respect to that
  parameter over the axis: each example's gradient would be summed with the
  other devices' examples before it is clipped, and the bound would not hold.
  (A loss varying over other axes through `*args` is checked on the traced
  program, `_check_loss_axes`: `method="vmap"` clips the sum JAX forms.)"""
  batch_axes = {a for x in examples for a in _ghost_trace.varying_axes(jax.typeof(x))}
  if not batch_axes:
    return
  paths = _diff_paths(params)
  for path, x in zip(paths, diff):
    missing = sorted(batch_axes - set(_ghost_trace.varying_axes(jax.typeof(x))))
    if missing:
      raise ValueError(
        f"Inside `shard_map`, `batch` varies over the mesh axes {missing} but"
        f" `params{path}` does not: JAX would sum each example's gradient with the other"
        " devices' examples before clipping it, breaking the per-example bound. Mark the"
        f" parameters as varying, `params = jax.lax.pcast(params, {tuple(missing)!r},"
        " to='varying')`, and `jax.lax.psum` the clipped sums over those axes afterwards."
      )


def _batch_leaves(batch: Any) -> tuple[list, Any, int]:
  pairs, treedef = jax.tree_util.tree_flatten_with_path(batch)
  if not pairs:
    raise ValueError(
      "`batch` holds no arrays: pass a pytree of arrays whose leading axis runs over the"
      " examples (B examples: every leaf of shape [B, ...])."
    )
  for path, x in pairs:
    if not _is_array(x) or np.ndim(x) == 0:
      what = f"shape {np.shape(x)}" if _is_array(x) else f"the {type(x).__name__} {x!r}"
      raise ValueError(
        f"`batch{jax.tree_util.keystr(path)}` is {what}: every leaf of `batch` must be an"
        " array with the examples on axis 0. Pass per-call constants in `*args` instead."
      )
  sizes = {int(np.shape(x)[0]) for _, x in pairs}
  if len(sizes) > 1:
    shapes = ", ".join(f"batch{jax.tree_util.keystr(p)}: {np.shape(x)}" for p, x in pairs)
    raise ValueError(
      f"Every leaf of `batch` must have the same leading (example) axis; got {shapes}. Put"
      " arrays that are not per-example in `*args`."
    )
  return [x for _, x in pairs], treedef, sizes.pop()


def _split_output(out: Any, has_aux: bool) -> tuple[Any, Any]:
  if has_aux:
    if not (isinstance(out, tuple | list) and len(out) == 2):
      raise TypeError(
        "With `has_aux=True`, `loss_fn` must return a pair (losses, aux); got"
        f" {type(out).__name__}."
      )
    return out[0], out[1]
  if isinstance(out, tuple | list):
    raise TypeError(
      f"`loss_fn` returned a {type(out).__name__}; if it returns (losses, aux), pass"
      " `has_aux=True`."
    )
  return out, None


def _check_losses(losses: Any, batch_size: int) -> None:
  shape = np.shape(losses)
  if shape != (1,):
    raise ValueError(
      "`loss_fn` must return one loss per example: shape [B], B being the leading axis"
      f" of the batch (here {batch_size}). Called on one example (a batch of one) it"
      f" returned shape {shape}, not (1,). If it returns the mean loss, return the"
      " per-example losses instead (drop the `.mean()`)."
    )
  if not jnp.issubdtype(jnp.result_type(losses), jnp.floating):
    raise TypeError(f"`loss_fn` must return floating-point losses, got {jnp.result_type(losses)}.")


def _weights(
  losses: jax.Array, norms: jax.Array, l2_norm_clip: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per example: the clipping factor (0 for non-finite), clipped, non-finite."""
  bad = ~jnp.isfinite(losses)
  threshold = jnp.asarray(l2_norm_clip, norms.dtype)
  scale, clipped = _base.example_scale(jnp.where(bad, jnp.nan, norms), threshold)
  return scale, clipped, bad | ~jnp.isfinite(norms)


def _vmap_run(
  call: _Call, l2_norm_clip: jax.typing.ArrayLike
) -> Callable[[list], tuple[list, _Stats]]:
  def example(diff, rest, ex, extra):
    (loss, aux), g = jax.value_and_grad(call.single, has_aux=True)(diff, rest, ex, extra)
    return loss, aux, g

  def run(examples: list) -> tuple[list, _Stats]:
    batched = jax.vmap(example, in_axes=(None, None, 0, None))
    loss, aux, g = batched(call.diff, call.rest, examples, call.extra)
    norms = _norms.tree_norm(g, 2.0, batch_ndim=1) if g else jnp.zeros_like(loss, jnp.float32)
    scale, clipped, bad = _weights(loss, norms, l2_norm_clip)
    return _base.weighted_sums(scale, g) if g else [], _Stats(loss, norms, clipped, bad, aux)

  return run


def _ghost_run(
  call: _Call, l2_norm_clip: jax.typing.ArrayLike, method: str, paths: list[str]
) -> Callable[[list], tuple[list, _Stats]]:
  def flat(*xs):
    d, r, e = len(call.diff), len(call.rest), len(call.examples)
    return call.single(
      list(xs[:d]), list(xs[d : d + r]), list(xs[d + r : d + r + e]), xs[d + r + e :]
    )

  avals = [_aval(x) for x in call.diff + call.rest]
  avals += [_aval(x, example=True) for x in call.examples]
  avals += [_aval(x) for x in call.extra]
  prog = _ghost_trace.trace(flat, avals, len(call.diff))
  _check_loss_axes(prog.out_avals[0], avals[: len(call.diff)], paths)
  plan = _ghost_plan.make_plan(prog, avals[: len(call.diff)])
  if method == "ghost":
    _refuse_fallbacks(plan, paths)
  gp = GhostPass(prog, plan)
  axes = [None] * len(call.rest) + [0] * len(call.examples) + [None] * len(call.extra)

  def run(examples: list) -> tuple[list, _Stats]:
    others = [*call.rest, *examples, *call.extra]
    out = jax.vmap(gp.example, in_axes=(None, axes))(call.diff, others)
    loss, aux, saved, cots, grads = out
    norms = gp.norms(gp.ghost_norms(call.diff, saved, cots, loss.shape[0]), grads)
    scale, clipped, bad = _weights(loss, norms, l2_norm_clip)
    sums = gp.sums(call.diff, saved, cots, grads, scale)
    return sums, _Stats(loss, norms, clipped, bad, aux)

  return run


def _aval(x: Any, example: bool = False) -> Any:
  """The abstract value `x` (one example of it) is traced with. A JAX array's
  own type keeps its varying manual axes (inside `shard_map`) and its
  sharding (explicit mesh axes), so that the program binds its ops as JAX
  would and the ghost pass's zeros and cotangents have the types of the
  values they stand for."""
  if not isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(np.shape(x)[int(example) :], jnp.result_type(x))
  aval = jax.typeof(x)
  if not example:
    return aval
  sharding = aval.sharding
  spec = jax.sharding.PartitionSpec(*sharding.spec[1:])
  return aval.update(shape=aval.shape[1:], sharding=sharding.update(spec=spec))


def _check_loss_axes(loss: Any, params: list, paths: list[str]) -> None:
  """Inside `shard_map`: raises if an example's loss varies over a mesh axis
  that a parameter does not (through `*args`, say, a per-device key or
  weight). JAX then sums that parameter's gradient over the axis, which
  ghost norms, taken from one device's activations, would not see."""
  loss_axes = set(_ghost_trace.varying_axes(loss))
  for path, aval in zip(paths, params):
    missing = sorted(loss_axes - set(_ghost_trace.varying_axes(aval)))
    if missing:
      raise ValueError(
        f"Inside `shard_map`, each example's loss varies over the mesh axes {missing} but"
        f" `params{path}` does not, so JAX sums its gradient over them: ghost norms cannot"
        " see that sum. Mark the parameters as varying over these axes too"
        f" (`jax.lax.pcast(params, {tuple(missing)!r}, to='varying')`, then `psum` the"
        " sums), or use method='vmap'."
      )


def _refuse_fallbacks(plan: list, paths: list[str]) -> None:
  bad = [f"params{path}: {p.reason}" for p, path in zip(plan, paths) if p.kind == "fallback"]
  if bad:
    raise ValueError(
      f"method='ghost' cannot compute the per-example norms of {len(bad)} parameter(s)"
      " without forming their per-example gradients:\n  " + "\n  ".join(bad) + "\nUse"
      " method='auto' to form the per-example gradients of these parameters alone (exact;"
      " memory: their size times the batch size), or method='vmap'."
    )


def _microbatched(run: Callable, call: _Call, size: int) -> tuple[list, _Stats]:
  """`run` over chunks of `size` examples; sums added, statistics joined.

  On one device, chunk j holds examples ``j * size ...``. Where the batch may
  be split over devices (in blocks, along its leading axis), chunk j holds
  examples ``j, j + n, j + 2n, ...`` (n chunks): one block of ``n``
  consecutive examples gives one example to each chunk, so that every chunk
  is split over the devices as the batch is, and no example moves.
  """
  b = call.batch_size
  n, rest = divmod(b, size)
  acc = [
    jnp.zeros_like(x, jnp.result_type(x.dtype, _norms.accumulation_dtype(x.dtype)))
    for x in call.diff
  ]

  def body(acc, chunk):
    sums, stats = run(chunk)
    return [a + s.astype(a.dtype) for a, s in zip(acc, sums)], stats

  head = [x[: n * size] for x in call.examples]
  if _norms.one_device():
    chunks = [x.reshape(n, size, *x.shape[1:]) for x in head]
    acc, stats = jax.lax.scan(body, acc, chunks)
    stats = jax.tree.map(lambda s: s.reshape(n * size, *s.shape[2:]), stats)
  else:
    _check_split(call, size)
    chunks = [jnp.swapaxes(x.reshape(size, n, *x.shape[1:]), 0, 1) for x in head]
    acc, stats = jax.lax.scan(body, acc, chunks)
    stats = jax.tree.map(lambda s: jnp.swapaxes(s, 0, 1).reshape(n * size, *s.shape[2:]), stats)
  if rest:
    sums, tail = run([x[n * size :] for x in call.examples])
    acc = [a + s.astype(a.dtype) for a, s in zip(acc, sums)]
    stats = jax.tree.map(lambda s, t: jnp.concatenate([s, t]), stats, tail)
  return [a.astype(x.dtype) for a, x in zip(acc, call.diff)], stats


def _check_split(call: _Call, size: int) -> None:
  """Raises unless the chunks of `size` examples can be split over the
  devices that the batch's leading axis is split over (explicit axes)."""
  for x in call.examples:
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", ())
    if not spec or spec[0] is None:
      continue
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    ways = int(np.prod([sharding.mesh.shape[a] for a in names]))
    if size % ways or call.batch_size % size:
      raise ValueError(
        f"`microbatch_size={size}` with a batch of {call.batch_size} examples split over"
        f" {ways} devices (mesh axes {names}): each microbatch is split over the same"
        f" devices, so `microbatch_size` must be a multiple of {ways} that divides the batch"
        " size. Pick such a size, or None for the whole batch at once."
      )


def _joined_aux(aux: Any) -> Any:
  """Per-example aux stacked ``[B, 1, ...]`` joined into ``[B, ...]``."""
  return jax.tree.map(
    lambda x: x.reshape(x.shape[:1] + x.shape[2:]) if x.ndim >= 2 and x.shape[1] == 1 else x, aux
  )


def clipped_grad(
  loss_fn: Callable[..., Any],
  l2_norm_clip: jax.typing.ArrayLike,
  *,
  method: str = "auto",
  has_aux: bool = False,
  microbatch_size: int | None = None,
) -> Callable[..., tuple[optax.Updates, ClippedGradInfo]]:
  """The sum over a batch of per-example gradients, each clipped to an L2 norm.

  The clipping step of DP-SGD, for any JAX model (Flax Linen or NNX,
  Equinox, plain functions), with no change to the model's code. The
  returned function computes, for ``loss_fn(params, batch, *args)``
  returning per-example losses ``L_i`` of shape ``[B]``,

      grads_sum = sum_i g_i * min(1, l2_norm_clip / ||g_i||),   g_i = dL_i/dparams,

  where ``||g_i||`` is the L2 norm of example i's gradient over all
  parameters. Each example's loss is computed by calling `loss_fn` on that
  example alone (a batch of one) under `jax.vmap`, so that gradients are
  per-example by construction; operations that mix the examples of a batch
  (batch normalisation over the batch, a mean over the batch inside the
  model) then see one example (compare ``info.losses`` with
  ``loss_fn(params, batch)`` to check that the model does not mix them).

  With ``method="ghost"`` no per-example gradient of a dense contraction
  (Dense layers, einsum, attention projections), embedding lookup or
  convolution is formed: its norm comes from the layer's inputs and output
  cotangents ("ghost clipping", Li et al., 2022; Bu et al., 2022), and the
  clipped sum from the same activations and cotangents, in one forward and
  one backward pass. Parameters used only elementwise (biases, norm scales)
  get their small per-example gradients directly. Any other use of a
  parameter raises a ValueError naming it. ``method="auto"`` forms the
  per-example gradients of those parameters alone and ghost-clips the
  rest. ``method="vmap"`` forms every per-example gradient
  (``jax.vmap(jax.grad(...))``): the reference, exact and general, at B
  times the memory of the gradients. All three give the same result up to
  float rounding. See the DP guide for what is supported.

  An example whose loss or gradient is not finite contributes zero and is
  counted in ``info.num_nonfinite`` (and ``info.num_clipped``), so that no
  example contributes more than `l2_norm_clip`.

  Args:
    loss_fn: ``loss_fn(params, batch, *args)`` returning per-example losses
      of shape ``[B]`` (``(losses, aux)`` with `has_aux`). Its floating-point
      array leaves of `params` are differentiated; other leaves (integer
      arrays, Python objects such as an Equinox module's activation) are
      held fixed and get None in the result (Python numbers too, unless
      `jax.jit` has made them arrays). Every leaf of `batch` must have
      the examples on axis 0; `*args` are shared by all examples.
    l2_norm_clip: Largest L2 norm of one example's gradient (>= 0); may be a
      traced array.
    method: ``"auto"``, ``"ghost"`` or ``"vmap"``, as above.
    has_aux: Whether `loss_fn` returns ``(losses, aux)``.
    microbatch_size: Process the batch in chunks of this many examples (the
      last chunk may be smaller), in a `jax.lax.scan`, to bound the memory
      of per-example values (chiefly for ``"vmap"``). None: all at once.

  Returns:
    A function ``(params, batch, *args) -> (grads_sum, info)``: `grads_sum`
    is shaped like `params` (in their dtypes), `info` a `ClippedGradInfo`.
    Call it inside `jax.jit`.

  Raises:
    ValueError: For an unknown `method`, a negative or NaN concrete
      `l2_norm_clip`, `params` without a floating-point array (every
      gradient would be None), losses not of shape ``[B]``, batch leaves with
      different leading axes, or (``method="ghost"``) a parameter that
      cannot be ghost-clipped.
    TypeError: For a `loss_fn` that is not callable, or whose output does
      not match `has_aux`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxclip
    >>> def loss_fn(params, batch):  # per-example squared errors, shape [B]
    ...   return (batch["x"] @ params["w"] - batch["y"]) ** 2
    >>> params = {"w": jnp.array([1.0, -1.0])}
    >>> batch = {"x": jnp.array([[1.0, 0], [0, 3], [0, 0]]), "y": jnp.array([0.0, 0, 1])}
    >>> grads, info = jax.jit(jaxclip.clipped_grad(loss_fn, 1.0))(params, batch)
    >>> info.norms
    Array([ 2., 18.,  0.], dtype=float32)
    >>> grads, info.num_clipped
    ({'w': Array([ 1., -1.], dtype=float32)}, Array(2, dtype=int32))

  References:
    Abadi et al., [Deep Learning with Differential
    Privacy](https://arxiv.org/abs/1607.00133), 2016. Li et al., [Large
    Language Models Can Be Strong Differentially Private
    Learners](https://arxiv.org/abs/2110.05679), 2022. Bu et al.,
    [Scalable and Efficient Training of Large Convolutional Neural Networks
    with Differential Privacy](https://arxiv.org/abs/2205.10683), 2022.
  """
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be a function, got {loss_fn!r}.")
  if not isinstance(method, str) or method not in METHODS:
    raise ValueError(
      f"`method` must be 'auto', 'ghost' or 'vmap', got {method!r}. 'auto' ghost-clips"
      " what it can and forms per-example gradients for the rest, 'ghost' refuses the"
      " rest, 'vmap' forms every per-example gradient."
    )
  _validate.check_threshold(l2_norm_clip, "l2_norm_clip", allow_schedule=False)
  has_aux = _validate.check_bool(has_aux, "has_aux")
  if microbatch_size is not None:
    microbatch_size = _validate.check_int(microbatch_size, "microbatch_size", 1)

  def clipped(params: optax.Params, batch: Any, *args: Any) -> tuple[Any, ClippedGradInfo]:
    call = _Call(loss_fn, has_aux, params, batch, args)
    if method == "vmap":
      run = _vmap_run(call, l2_norm_clip)
    else:
      run = _ghost_run(call, l2_norm_clip, method, _diff_paths(params))
    if microbatch_size is None or microbatch_size >= call.batch_size:
      sums, stats = run(call.examples)
    else:
      sums, stats = _microbatched(run, call, microbatch_size)
    info = ClippedGradInfo(
      stats.losses,
      stats.norms,
      jnp.sum(stats.clipped, dtype=jnp.int32),
      jnp.sum(stats.nonfinite, dtype=jnp.int32),
      _joined_aux(stats.aux) if has_aux else None,
    )
    return call.grads_tree(sums), info

  return clipped


def _diff_paths(params: Any) -> list[str]:
  pairs = jax.tree_util.tree_flatten_with_path(params)[0]
  return [jax.tree_util.keystr(p) for p, x in pairs if _norms.is_inexact(x)]
