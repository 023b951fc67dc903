"""A flow as a TFP distribution that runs the flow once per call and never serves stale numbers."""

import tensorflow as tf
import tensorflow_probability as tfp

tfb, tfd = tfp.bijectors, tfp.distributions


class FlowDistribution(tfd.TransformedDistribution):
  """`tfd.TransformedDistribution(distribution, tfb.Invert(flow))`, one flow pass per call.

  `flow` maps data to latents (the direction Real NVP trains in, `model.flow`);
  `distribution` is the prior on latents (a unit Gaussian in `RealNVP`, or any TFP
  distribution with the flow's latent event shape, e.g. a learned one). So

    log_prob(x) = distribution.log_prob(flow(x)) + log|det d flow(x) / dx|
    sample()    = flow^-1(distribution.sample())

  It is TFP's own `TransformedDistribution` (`bijector` is `tfb.Invert(flow)`; `isinstance`
  holds, and like TFP's it is a `CompositeTensor`: it goes through `tf.nest` and into a
  `tf.function` as an argument). TFP's subclass hooks `_log_prob` and `_sample_and_log_prob` call
  the flow's one-pass `forward_and_log_det` / `inverse_and_log_det`, so each coupling network runs
  once per call; the flow caches nothing, so the numbers always follow the current weights.
  `trainable_variables` lists the flow's variables (and the prior's).

  `labels` (int, any shape) makes it `p(x | y)` for a class-conditional flow: they are passed to
  the flow with every call (as `bijector_kwargs={'labels': labels}`), and `distribution` should
  be the prior for the same labels (batch shape `labels.shape`, e.g. `ClassConditionalNormal`).
  Each latent is then transformed with its own label (labels broadcast against the batch), so
  `sample()` gives one image per label and `log_prob(x)` takes `x` `[*labels.shape, H, W, C]`.

  `flow_variables` is not an input. TFP rebuilds a `CompositeTensor` from its constructor's
  arguments (in `tf.nest`, in a `tf.function` taking it); this one puts the flow's `tf.Variable`s
  in the type spec, so that `tf.nest.flatten(dist, expand_composites=True)` and the
  `trainable_variables` of TFP distributions built on it (`tfd.Sample(dist, 2)`) list them. When
  TFP passes them back (placeholders of the same variables inside a `tf.function`), they are only
  handed back as the spec's part: the flow always reads its own variables, so the numbers are the
  current weights' and gradients reach the model's variables.

  The flow itself (Keras layers) is not a tensor: the type spec holds it by identity, like TFP's
  callable parameters, so the spec cannot be serialized (no SavedModel signature takes the
  distribution).

  Example:
    dist = FlowDistribution(learned_prior, model.flow, name='flow_with_learned_prior')
    loss = -tf.reduce_mean(dist.log_prob(images))
  """

  def __init__(self, distribution, flow, validate_args=False, name=None, labels=None,
               flow_variables=None):
    parameters = dict(locals())
    del parameters['flow_variables']  # not a parameter (see the class docstring)
    # Out of tf.Module's sight (a function), so `trainable_variables` stay the flow's own.
    self._given_flow_variables = None if flow_variables is None else lambda: flow_variables
    rank = distribution.event_shape.rank
    if hasattr(flow, 'forward_and_log_det') and rank is not None and rank < 3:
      raise ValueError(f'FlowDistribution: the prior\'s event shape must be the latent\'s '
                       f'[..., H, W, C] (rank 3 or more), got {distribution.event_shape}; e.g. '
                       'tfd.Independent(prior, 3) or tfd.Sample(tfd.Normal(0., 1.), [H, W, C]).')
    self._flow = flow
    self._labels = None if labels is None else tf.convert_to_tensor(labels, tf.int32)
    super().__init__(distribution, tfb.Invert(flow), kwargs_split_fn=self._split_kwargs,
                     validate_args=validate_args, parameters=parameters, name=name or flow.name)

  def _split_kwargs(self, kwargs):
    distribution_kwargs = kwargs.get('distribution_kwargs', {})
    bijector_kwargs = kwargs.get('bijector_kwargs', {})
    if self._labels is not None:
      bijector_kwargs = {'labels': self._labels, **bijector_kwargs}
    return distribution_kwargs, bijector_kwargs

  @property
  def labels(self):
    """The labels the flow is conditioned on (None: unconditional)."""
    return self._labels

  @property
  def flow(self):
    """The data-to-latent bijector (`bijector` is its inverse, TFP's generative direction)."""
    return self._flow

  @property
  def flow_variables(self):
    """The flow's `tf.Variable`s: the type spec's part (as TFP passed it back, if it did)."""
    if self._given_flow_variables is not None:
      return self._given_flow_variables()
    layers = getattr(self._flow, 'keras_layers', None)
    if layers is None:  # another bijector: tf.Module's walk
      return tuple(self._flow.variables)
    return tuple(getattr(v, 'value', v) for layer in layers for v in layer.weights)

  @classmethod
  def _parameter_properties(cls, dtype, num_classes=None):
    # The flow has no batch shape (`flow.experimental_batch_shape() == []`); labels share the
    # distribution's.
    return dict(distribution=tfp.util.BatchedComponentProperties(),
                labels=tfp.util.ParameterProperties(event_ndims=0, is_preferred=False))

  def _one_pass(self, direction, x, **bijector_kwargs):
    """`(value, log-det summed over the event)` of the flow in `direction` ('forward': data to
    latent): one pass of a `FlowBijector`; TFP's two calls for any other bijector."""
    one_pass = getattr(self._flow, f'{direction}_and_log_det', None)
    if one_pass is not None:
      value, log_det = one_pass(x, **bijector_kwargs)
      return value, self._sum_extra_event_dims(log_det)
    event_ndims = self.distribution.event_shape.rank
    value = getattr(self._flow, direction)(x, **bijector_kwargs)
    log_det = getattr(self._flow, f'{direction}_log_det_jacobian')(
        x, event_ndims=event_ndims, **bijector_kwargs)
    return value, log_det

  def _sum_extra_event_dims(self, log_det):
    """The flow's log-det is per `[H, W, C]`; sums it over any leading event dims."""
    extra = (self.distribution.event_shape.rank or 3) - 3
    return tf.reduce_sum(log_det, axis=list(range(-extra, 0))) if extra else log_det

  def _prior_for_sampling(self):
    """The prior broadcast to this distribution's batch shape (labels may widen it)."""
    if (self.batch_shape.is_fully_defined() and
        self.distribution.batch_shape == self.batch_shape):
      return self.distribution
    return tfd.BatchBroadcast(self.distribution, with_shape=self.batch_shape_tensor())

  # TFP's subclass hooks. `_prob` (TFP's: exp of `_log_prob`) and `sample` (TFP's: the prior's
  # sample through `bijector.forward`, i.e. one `flow.inverse`) need no override.
  def _log_prob(self, y, **kwargs):
    distribution_kwargs, bijector_kwargs = self._split_kwargs(kwargs)
    latent, log_det = self._one_pass('forward', y, **bijector_kwargs)
    base = self.distribution.log_prob(latent, **distribution_kwargs)
    return base + tf.cast(log_det, base.dtype)

  def _sample_and_log_prob(self, sample_shape, seed, **kwargs):
    distribution_kwargs, bijector_kwargs = self._split_kwargs(kwargs)
    latent, base = self._prior_for_sampling().experimental_sample_and_log_prob(
        sample_shape, seed=seed, **distribution_kwargs)
    y, log_det = self._one_pass('inverse', latent, **bijector_kwargs)
    return y, base - tf.cast(log_det, base.dtype)

  def experimental_local_measure(self, y, backward_compat=False, **kwargs):
    distribution_kwargs, bijector_kwargs = self._split_kwargs(kwargs)
    latent, log_det = self._one_pass('forward', y, **bijector_kwargs)
    base, tangent_space = self.distribution.experimental_local_measure(
        latent, backward_compat=backward_compat, **distribution_kwargs)
    if isinstance(tangent_space, tfp.experimental.tangent_spaces.FullSpace):
      return base + tf.cast(log_det, base.dtype), tangent_space
    # Another tangent space: TFP's density correction (a second flow pass).
    correction, tangent_space = self.bijector.experimental_compute_density_correction(
        latent, tangent_space, backward_compat=backward_compat,
        event_ndims=self.event_shape.rank, **bijector_kwargs)
    return base - tf.cast(correction, base.dtype), tangent_space
