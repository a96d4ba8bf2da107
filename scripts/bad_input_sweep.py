"""Sweep of the bad-input table (tests/test_bad_inputs.py): how each case ends.

Runs every case of `CASES` (bad inputs that must raise a clear error) and
`EDGES` (edge inputs that must give a result, e.g. empty batches) and prints
the counts: tried / clear error / handled edge / obscure / silent / hang,
then every case that is not clear or handled, with what happened.

    cd <repository> && .venv/bin/python scripts/bad_input_sweep.py [--seconds 30] [--backend torch]
"""

import argparse
import collections
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument('--seconds', type=float, default=30., help='a case running longer hangs')
parser.add_argument('--backend', choices=('auto', 'extension', 'torch'), default=None,
                    help='TORCHNTK_BACKEND for this run (default: as set in the environment)')
args = parser.parse_args()
if args.backend:
    os.environ['TORCHNTK_BACKEND'] = args.backend
sys.path.insert(0, os.getcwd())

import warnings  # noqa: E402

warnings.filterwarnings('ignore')
from tests.test_bad_inputs import CASES, EDGES, classify  # noqa: E402
from torchntk.ops import extension  # noqa: E402

counts, problems = collections.Counter(), []
for case in CASES + EDGES:
    kind, what = classify(case, args.seconds)
    counts[kind] += 1
    if kind not in ('clear', 'handled'):
        problems.append((kind, case.id, what))

print(f"backend: {extension.backend()}")
print(f"tried {len(CASES) + len(EDGES)} ({len(CASES)} bad inputs, {len(EDGES)} edge inputs) / "
      f"clear error {counts['clear']} / handled edge {counts['handled']} / "
      f"obscure {counts['obscure']} / silent {counts['silent']} / hang {counts['hang']}")
for kind, case_id, what in sorted(problems):
    print(f"  {kind:8s} {case_id}: {what}")
