"""The import graph runs one way (../shared/DESIGN.md section 3) and has no cycles.

Reads every `import` in gemjax/ (module level and inside functions: a late
import is still a dependency) with `ast`, so nothing is executed. Floors:

    0  errors, config, batch, hostmem, kernels/,        the ground
       parallel/axes
    1  tokenizers/, parallel/                            above the ground (parallel above kernels)
    2  model/ | data/                                    side by side: neither imports the other
    3  train/  <  4  inference/ | convert/  <  5  eval/   on top (eval uses train's state
                                                         and checkpoints, never the reverse;
                                                         convert writes train's checkpoints)
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / 'gemjax'


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT.parent).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def imports_of(path: pathlib.Path, known: set[str]) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from gemjax import batch` names the module gemjax.batch.
      names = [f'{node.module}.{a.name}' for a in node.names] + [node.module]
    else:
      continue
    for name in names:
      while name and name not in known:
        name = name.rpartition('.')[0]
      if name and name != 'gemjax':
        out.add(name)
  return out


def graph() -> dict[str, set[str]]:
  files = {module_name(p): p for p in ROOT.rglob('*.py')}
  known = set(files)
  return {m: imports_of(p, known) - {m} for m, p in files.items()}


def floor(module: str) -> tuple[int, str]:
  parts = module.split('.')
  top = parts[1] if len(parts) > 1 else ''
  if module in ('gemjax.errors', 'gemjax.config', 'gemjax.batch', 'gemjax.parallel.axes',
                'gemjax.hostmem') \
      or top == 'kernels':
    return 0, top
  if top in ('tokenizers', 'parallel'):
    return 1, top
  if top in ('model', 'data'):
    return 2, top
  if top in ('train', 'inference', 'convert', 'eval'):
    return {'train': 3, 'inference': 4, 'convert': 4, 'eval': 5}[top], top
  return 0, top     # gemjax/__init__.py


def test_every_import_points_down_or_sideways_within_a_room():
  bad = []
  for src, deps in graph().items():
    (f_src, room_src) = floor(src)
    for dst in deps:
      f_dst, room_dst = floor(dst)
      if room_src == room_dst:
        continue
      if f_dst > f_src or (f_dst == f_src and f_src > 0):
        bad.append(f'{src} (floor {f_src}) imports {dst} (floor {f_dst})')
  assert not bad, '\n'.join(sorted(bad))


def test_kernels_import_only_jax_and_themselves():
  g = graph()
  for m in g:
    if m.startswith('gemjax.kernels'):
      assert all(d.startswith('gemjax.kernels') for d in g[m]), (m, g[m])


def test_no_import_cycles():
  g = graph()
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(g.get(m, ())):
      if state.get(d) == 1:
        raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(d):] + [d]))
      if d not in state:
        visit(d)
    stack.pop()
    state[m] = 2

  for m in sorted(g):
    if m not in state:
      visit(m)
