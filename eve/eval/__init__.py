"""Evaluation: public benchmark readers, lenient metrics, and a batched greedy runner.

`python -m eve.eval --model DIR --benchmark NAME [--data PATH] --out DIR`; see `eve.eval.runner`.
"""

from eve.eval.benchmarks import BENCHMARKS, EvalSample, build_question, get_benchmark

__all__ = ["BENCHMARKS", "EvalSample", "build_question", "get_benchmark"]
