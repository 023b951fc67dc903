"""A flow as a TFP distribution that runs the flow once per call and never serves stale numbers."""

import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.distributions import transformed_distribution
from tensorflow_probability.python.internal import parameter_properties

from tfp_realnvp.bijectors.base import one_pass

tfb = tfp.bijectors


class FlowDistribution(transformed_distribution._TransformedDistribution):  # pylint: disable=protected-access
  """`tfd.TransformedDistribution(distribution, tfb.Invert(flow))`, one flow pass per call.

  `flow` maps data to latents (the direction Real NVP trains in, `model.flow`);
  `distribution` is the prior on latents (a unit Gaussian in `RealNVP`, or any TFP
  distribution with the flow's latent event shape, e.g. a learned one). So

    log_prob(x) = distribution.log_prob(flow(x)) + log|det d flow(x) / dx|
    sample()    = flow^-1(distribution.sample())

  It is TFP's own `TransformedDistribution` (`bijector` is `tfb.Invert(flow)`), except that each
  method runs inside `one_pass()`: `log_prob` runs every coupling network once, not twice, and
  nothing is cached beyond the call, so the numbers always follow the current weights.
  `trainable_variables` lists the flow's variables (and the prior's).

  `labels` (int, any shape) makes it `p(x | y)` for a class-conditional flow: they are passed to
  the flow with every call (as `bijector_kwargs={'labels': labels}`), and `distribution` should
  be the prior for the same labels (batch shape `labels.shape`, e.g. `ClassConditionalNormal`).
  Each latent is then transformed with its own label (labels broadcast against the batch), so
  `sample()` gives one image per label and `log_prob(x)` takes `x` `[*labels.shape, H, W, C]`.

  Example:
    dist = FlowDistribution(learned_prior, model.flow, name='flow_with_learned_prior')
    loss = -tf.reduce_mean(dist.log_prob(images))
  """

  def __init__(self, distribution, flow, validate_args=False, name=None, labels=None):
    parameters = dict(locals())
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

  @classmethod
  def _parameter_properties(cls, dtype, num_classes=None):
    # The flow has no batch shape (`flow.experimental_batch_shape() == []`); labels share the
    # distribution's.
    return dict(distribution=parameter_properties.BatchedComponentProperties(),
                labels=parameter_properties.ParameterProperties(
                    event_ndims=0, is_preferred=False, default_constraining_bijector_fn=(
                        parameter_properties.BIJECTOR_NOT_IMPLEMENTED)))

  @property
  def flow(self):
    """The data-to-latent bijector (`bijector` is its inverse, TFP's generative direction)."""
    return self._flow

  def _call_sample_n(self, sample_shape, seed, **kwargs):
    with one_pass():
      return super()._call_sample_n(sample_shape, seed, **kwargs)

  def _sample_and_log_prob(self, sample_shape, seed, **kwargs):
    with one_pass():
      return super()._sample_and_log_prob(sample_shape, seed, **kwargs)

  def _log_prob(self, y, **kwargs):
    with one_pass():
      return super()._log_prob(y, **kwargs)

  def _prob(self, y, **kwargs):
    with one_pass():
      return super()._prob(y, **kwargs)

  def experimental_local_measure(self, y, backward_compat=False, **kwargs):
    with one_pass():
      return super().experimental_local_measure(y, backward_compat=backward_compat, **kwargs)
