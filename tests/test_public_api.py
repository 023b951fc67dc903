"""The package uses public TensorFlow, Keras and TFP APIs only; `tfp_realnvp/compat.py` holds the
few framework internals that have no public way (each with what it buys)."""

import ast
import importlib
import inspect
import pathlib
import pkgutil


import launch
import tfp_realnvp

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPAT = ROOT / 'tfp_realnvp' / 'compat.py'
SOURCES = sorted(p for folder in ('tfp_realnvp', 'launch') for p in (ROOT / folder).rglob('*.py'))
PRIVATE_MODULES = ('tensorflow.python', 'keras.src', 'tensorflow_probability.python',
                   'tf_keras.src')

# TFP's documented way to write a bijector or distribution is to implement these.
TFP_SUBCLASS_HOOKS = {
    '_forward', '_inverse', '_forward_log_det_jacobian', '_inverse_log_det_jacobian',
    '_forward_event_shape', '_forward_event_shape_tensor', '_inverse_event_shape',
    '_inverse_event_shape_tensor', '_forward_dtype', '_inverse_dtype', '_is_increasing',
    '_parameter_properties', '_batch_shape', '_batch_shape_tensor', '_event_shape',
    '_event_shape_tensor', '_sample_n', '_log_prob', '_prob', '_mean', '_mode', '_stddev',
    '_variance', '_entropy', '_default_event_space_bijector',
    '_sample_and_log_prob'}  # (listed in `tfd.Distribution`'s docstring, "Subclassing")


def _trees():
  return [(path, ast.parse(path.read_text(), str(path))) for path in SOURCES]


def _names_defined_in_the_package():
  """(Not caught: an instance attribute a framework sets in its own `__init__` and the package
  sets on `self` too; compat.lower_is_better is the one such use.)

  Every name the package defines outside compat.py: functions, classes, arguments, variables,
  and attributes it sets on its own objects (`self.x = ...`, `cls.x = ...`). An attribute set on
  anything else (`optimizer._x = ...`, `tf.Something._x += ...`) is not the package's."""
  names = set()
  for path, tree in _trees():
    if path == COMPAT:
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        names.add(node.name)
      elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
          getattr(node.value, 'id', None) in ('self', 'cls'):
        names.add(node.attr)
      elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        names.add(node.id)
      elif isinstance(node, ast.arg):
        names.add(node.arg)
  return names


def _private(name):
  return name.startswith('_') and not name.startswith('__')


def test_no_import_of_a_frameworks_private_modules():
  found = []
  for path, tree in _trees():
    for node in ast.walk(tree):
      modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
      for module in modules:
        if module.startswith(PRIVATE_MODULES) or '_pywrap' in module:
          found.append(f'{path.relative_to(ROOT)}:{node.lineno} imports {module}')
  assert not found, 'private framework modules imported:\n' + '\n'.join(found)


def test_no_use_of_a_frameworks_private_names_outside_compat():
  # A private name the package does not define itself is a framework's (a private class to
  # subclass, a private method to call, a private attribute to read or write).
  ours = _names_defined_in_the_package()
  found = []
  for path, tree in _trees():
    if path == COMPAT:
      continue
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in ours:
        found.append(f'{path.relative_to(ROOT)}:{node.lineno} uses .{node.attr}')
      elif isinstance(node, ast.Attribute) and (node.attr == '__internal__' or (
          node.attr in ('python', 'src') and getattr(node.value, 'id', None) in (
              'tf', 'tfp', 'keras', 'tensorflow', 'tensorflow_probability'))):
        found.append(f'{path.relative_to(ROOT)}:{node.lineno} uses .{node.attr}')
      elif isinstance(node, ast.Call) and getattr(node.func, 'id', None) in (
          'getattr', 'setattr', 'hasattr') and len(node.args) > 1 and isinstance(
              node.args[1], ast.Constant) and _private(str(node.args[1].value)) and \
          node.args[1].value not in ours:
        found.append(f'{path.relative_to(ROOT)}:{node.lineno} uses {node.args[1].value!r}')
  assert not found, ('framework internals used outside tfp_realnvp/compat.py:\n' +
                     '\n'.join(found))


def _package_classes():
  modules = []
  for package in (tfp_realnvp, launch):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):
      if info.name.startswith('launch.') and info.name.split('.')[-1] in (
          'train', 'evaluate', 'sample', 'score', 'export', 'benchmark'):
        continue  # commands: importing one defines its absl flags (no classes of their own)
      modules.append(importlib.import_module(info.name))
  for module in modules:
    for _, cls in inspect.getmembers(module, inspect.isclass):
      if cls.__module__ == module.__name__:
        yield cls


def _ours(cls):
  return cls.__module__.split('.')[0] in ('tfp_realnvp', 'launch')


def _checked(cls):
  return cls.__module__ != 'tfp_realnvp.compat'  # the one place for framework internals


def test_no_override_of_a_frameworks_private_methods_or_attributes():
  found = []
  for cls in filter(_checked, _package_classes()):
    # Its own members and those of the package's classes it inherits (mixins included).
    members = {name: klass for klass in reversed(cls.__mro__) if _ours(klass) and _checked(klass)
               for name in vars(klass)}
    for name, klass in members.items():
      if not _private(name) or name in TFP_SUBCLASS_HOOKS or name == '_abc_impl':  # (abc's)
        continue
      value = vars(klass)[name]
      if getattr(getattr(value, 'fget', value), '__module__', '').split('.')[0] == (
          'tensorflow_probability'):
        continue  # put there by TFP's metaclass (`auto_composite_tensor`'s `_type_spec`)
      owners = [base for base in cls.__mro__[1:] if not _ours(base) and name in vars(base)]
      if owners:
        found.append(f'{cls.__module__}.{cls.__name__}.{name} overrides '
                     f'{owners[0].__module__}.{owners[0].__name__}.{name}')
  assert not found, 'framework internals overridden:\n' + '\n'.join(found)


def test_no_subclass_of_a_frameworks_private_class():
  found = [f'{cls.__module__}.{cls.__name__} subclasses {base.__module__}.{base.__name__}'
           for cls in filter(_checked, _package_classes()) for base in cls.__bases__
           if not _ours(base) and _private(base.__name__) and base.__module__ != 'builtins']
  assert not found, 'private framework classes subclassed:\n' + '\n'.join(found)
