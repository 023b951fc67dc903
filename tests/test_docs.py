"""The documentation runs as written: every ```python block of README.md and docs/*.md is
executed (each file's blocks in order, in one namespace per file, in a fresh folder), and the
README stays the short page it is meant to be, with the test command that .ci/run runs.

Blocks not meant to run use another fence language (```text, ```bash)."""

import glob
import os
import re
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ['README.md'] + sorted(os.path.relpath(p, ROOT)
                               for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
FENCE = re.compile(r'^[ \t]*```(\S*)\n(.*?)^[ \t]*```[ \t]*$', re.S | re.M)  # also in lists


def read(name):
  with open(os.path.join(ROOT, name), encoding='utf-8') as f:
    return f.read()


def blocks(name, language):
  """`(first line number, code)` of each fenced block of `language` in the file `name`."""
  text = read(name)
  return [(text.count('\n', 0, m.start()) + 2, textwrap.dedent(m.group(2)))
          for m in FENCE.finditer(text) if m.group(1) == language]


def run_python_blocks(name):
  """Runs the file's Python blocks in order in one namespace (errors point at the .md line)."""
  namespace = {'__name__': f'docs:{name}'}
  for line, code in blocks(name, 'python'):
    exec(compile('\n' * (line - 1) + code, os.path.join(ROOT, name), 'exec'), namespace)  # pylint: disable=exec-used
  return namespace


def check_tfp(namespace, out):
  first, _, last = out.split('train bits/dim ')[1].split()[:3]
  assert float(last) < float(first) - 0.5  # the TFP training loop learns
  assert out.strip().endswith('2')  # the learned prior's two variables join the flow's
  assert namespace['dist'].name == 'digits'


def check_readme(namespace, out):
  assert namespace['samples'].dtype.name == 'uint8'
  assert namespace['samples'].shape == (4, 28, 28, 1)


def check_models(namespace, out):
  assert not namespace['glow'].needs_data_initialization()
  assert namespace['model'].num_classes == 10


CHECKS = {'README.md': check_readme, os.path.join('docs', 'tfp.md'): check_tfp,
          os.path.join('docs', 'models.md'): check_models}
WITH_PYTHON = [name for name in FILES if blocks(name, 'python')]


@pytest.mark.parametrize('name', WITH_PYTHON)
def test_python_examples_run_as_written(name, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # the examples write files (a SavedModel) where they run
  namespace = run_python_blocks(name)
  CHECKS.get(name, lambda namespace, out: None)(namespace, capsys.readouterr().out)


def test_every_page_with_examples_is_tested():
  assert set(WITH_PYTHON) >= {'README.md', *CHECKS}


@pytest.mark.parametrize('name', FILES)
def test_every_fence_names_its_language(name):
  text = read(name)
  assert text.count('```') % 2 == 0, f'{name}: an unclosed fence'
  for match in FENCE.finditer(text):
    assert match.group(1) in ('python', 'bash', 'text', 'yaml'), (
        f'{name}, line {text.count(chr(10), 0, match.start()) + 1}: a fence without a language '
        '(python runs in this test; bash, text and yaml do not)')


def test_readme_is_short():
  assert len(read('README.md').encode('utf-8')) <= 15_000


def test_readme_gives_the_commands_ci_runs():
  ci = read(os.path.join('.ci', 'run'))
  commands = [code.strip() for _, code in blocks('README.md', 'bash')]
  install, test = 'pip install -r requirements.txt -e ".[test]"', 'python -m pytest -q'
  assert f'{install} && {test}' in ci
  assert any(install in code.splitlines() for code in commands)
  assert any(test in code.splitlines() for code in commands)


@pytest.mark.parametrize('name', FILES)
def test_links_lead_to_files_that_exist(name):
  folder = os.path.dirname(os.path.join(ROOT, name))
  prose = re.sub(r'`[^`\n]*`', '', FENCE.sub('', read(name)))  # code is not links
  for target in re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', prose):
    if '://' not in target:
      assert os.path.exists(os.path.join(folder, target)), f'{name} links to {target}'
