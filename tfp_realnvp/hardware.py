"""What the machine offers for mixed precision: native bfloat16 or float16 arithmetic."""

import tensorflow as tf


def _cpu_flags():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          return set(line.split(':', 1)[1].split())
  except OSError:
    pass
  return set()


def native_precision(compute_dtype):
  """`(native, explanation)`: whether this machine's accelerators (or, without one, its CPU)
  compute in `compute_dtype` ('bfloat16' or 'float16') natively, and why, in a sentence.

  Native bfloat16: NVIDIA GPUs from compute capability 8.0 (A100, H100), CPUs with AVX512_BF16
  or AMX-BF16. Native float16: NVIDIA GPUs from 7.0 (tensor cores). Elsewhere TF emulates the
  type through float32, so mixed precision is slower than float32 there, not faster."""
  gpus = tf.config.list_physical_devices('GPU')
  if gpus:
    details = [tf.config.experimental.get_device_details(gpu) for gpu in gpus]
    capabilities = [d.get('compute_capability') or (0, 0) for d in details]
    needed = (8, 0) if compute_dtype == 'bfloat16' else (7, 0)
    slow = [c for c in capabilities if tuple(c) < needed]
    if slow:
      return False, (f'{compute_dtype} needs GPU compute capability {needed[0]}.{needed[1]} or '
                     f'newer for tensor cores; found {", ".join(f"{a}.{b}" for a, b in slow)}: '
                     'expect it no faster than float32.')
    return True, f'{compute_dtype} runs natively on the tensor cores of {len(gpus)} GPU(s).'
  flags = _cpu_flags()
  if compute_dtype == 'bfloat16':
    found = sorted(flags & {'avx512_bf16', 'amx_bf16'})
    if found:
      return True, f'bfloat16 runs natively on this CPU ({", ".join(found)}).'
    return False, ('this CPU has no AVX512_BF16 or AMX-BF16: TF emulates bfloat16 through '
                   'float32, so --mixed_precision=bfloat16 is slower than float32 here.')
  found = sorted(flags & {'avx512_fp16', 'amx_fp16'})
  if found:
    return True, f'float16 runs natively on this CPU ({", ".join(found)}).'
  return False, ('float16 mixed precision is for GPUs with tensor cores; on this CPU it is '
                 'emulated and slower than float32.')
