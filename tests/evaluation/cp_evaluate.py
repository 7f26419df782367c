"""Run under torchrun by test_evaluate_cp.py: tools/evaluate.py's main for several checkpoints in
one launch (the ranks' start-up, not the scoring, dominates a tiny run). argv: a JSON list of
argument lists; the exit status is the first non-zero one."""

import json
import sys

from tools import evaluate

if __name__ == "__main__":
    status = 0
    for argv in json.loads(sys.argv[1]):
        status = status or evaluate.main(argv)
    sys.exit(status)
